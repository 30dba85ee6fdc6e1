"""The serving process: loraserve's OpenAI-compatible API over one vLLM engine and many LoRA adapters.

It owns what runs in the server: the settings (``config``), the engine wrapper
(``engine``), the adapter store as the server opens it (``store``), the FastAPI
app with one package per API area (``api/``: a thin ``api_router.py``, a
pydantic ``protocol.py`` and one ``serving.py`` class each; the admin API for
prompt routes is ``api/prompt_routes/``, the model-name-to-adapter choice
``api/selector.py``), auth, limits and metrics, and the ``loraserve`` command
line (``cli``, ``keys_cli``, ``adapters_cli``). It is the top layer: it uses
``adapter_store`` and ``routing`` as libraries and gets ``lora_ops`` and
``bitnet`` only through vLLM's plugin entry points; only the CLI reaches
``checkpoints`` (``loraserve demo-assets``) and ``loadtests.runner``
(``loraserve loadtest``). None of those imports ``serving`` back
(``tests/test_boundaries.py``).
"""
