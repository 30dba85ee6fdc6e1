"""The naive design, for comparison only: transformers + PEFT, one model, adapter switched per request.

    python -m loadtests.naive_server --config configs/dev.yaml --port 8100

The straightforward way to serve several LoRA adapters without a serving
engine: load the base model once with every adapter of the config attached
(PEFT ``load_adapter``), and for each request ``set_adapter`` (or disable the
adapters for the base model) and run ``generate``. Adapter state is global to
the model, so requests run one at a time under a lock; nothing is batched.
This is the generous version of the design (adapters preloaded, not read from
disk per request).

It speaks the same API shape as loraserve for what the load test sends:
``/v1/completions`` and ``/v1/chat/completions`` (streamed or not, with
``stream_options.include_usage``, ``max_tokens``, ``temperature``,
``ignore_eos``), ``/v1/models`` (with ``max_model_len``) and ``/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class NaiveModel:
    """One transformers model with every adapter attached; one request at a time."""

    def __init__(self, settings) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(str(settings.model.tokenizer or settings.model.path))
        base = AutoModelForCausalLM.from_pretrained(str(settings.model.path), dtype=dtype[settings.model.dtype])
        adapters = list(settings.adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[0].path), adapter_name=adapters[0].name)
        for adapter in adapters[1:]:
            self.model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        self.model.eval()
        self.names = [settings.model.name] + [a.name for a in adapters]
        self.lock = threading.Lock()

    async def generate(self, model: str, prompt_ids: list[int], max_tokens: int, temperature: float,
                       ignore_eos: bool) -> AsyncIterator[int]:  # fmt: skip
        """Yield generated token ids as they come (``generate`` runs in a thread, holding the lock)."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def emit(token: int | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        class Streamer(BaseStreamer):
            first = True

            def put(self, value) -> None:
                if self.first:  # generate() first hands over the prompt
                    self.first = False
                    return
                for token in value.reshape(-1).tolist():
                    emit(token)

            def end(self) -> None:
                pass  # run() signals the end, also when generate() fails

        def run() -> None:
            with self.lock, torch.inference_mode():
                kwargs = dict(
                    input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens, streamer=Streamer(),
                    do_sample=temperature > 0, pad_token_id=self.tokenizer.eos_token_id,
                )  # fmt: skip
                if temperature > 0:
                    kwargs["temperature"] = temperature
                if ignore_eos:
                    kwargs["min_new_tokens"] = max_tokens
                try:
                    if model == self.settings.model.name:
                        with self.model.disable_adapter():
                            self.model.generate(**kwargs)
                    else:
                        self.model.set_adapter(model)
                        self.model.generate(**kwargs)
                finally:
                    emit(None)

        threading.Thread(target=run, daemon=True).start()
        while (token := await tokens.get()) is not None:
            yield token

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        """The request's prompt as token ids (chat: through the chat template)."""
        from transformers import BatchEncoding

        if not chat:
            return list(self.tokenizer(body["prompt"])["input_ids"])
        # One conversation, tokenized: a BatchEncoding (transformers 5) or the ids themselves.
        encoded = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
        if isinstance(encoded, BatchEncoding):
            return list(encoded["input_ids"])
        return cast(list[int], encoded)

    def decode(self, ids: list[int]) -> str:
        """One sequence's text (transformers types ``decode`` for batches too)."""
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))


def build_app(settings) -> FastAPI:
    """The OpenAI-shaped app around one :class:`NaiveModel` (FastAPI resolves the annotations at module level)."""
    naive = NaiveModel(settings)
    app = FastAPI()
    limit = settings.model.max_model_len

    def error(status: int, message: str, param: str | None, code: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "BadRequestError"
                            if status == 400 else "NotFoundError", "param": param, "code": code}})  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [{"id": name, "object": "model", "owned_by": "naive", "max_model_len": limit} for name in naive.names]
        return {"object": "list", "data": cards}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        model = body.get("model")
        if model not in naive.names:
            return error(404, f"The model {model!r} does not exist.", "model", "model_not_found")
        prompt_ids = naive.prompt_ids(body, chat)
        max_tokens = int(body.get("max_tokens") or 16)
        if len(prompt_ids) + max_tokens > limit:
            return error(400, f"{len(prompt_ids)} + {max_tokens} tokens exceed {limit}", "max_tokens",
                         "context_length_exceeded")  # fmt: skip
        temperature, ignore_eos = float(body.get("temperature", 1.0)), bool(body.get("ignore_eos"))
        rid, created = f"naive-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish}
            key = "delta" if stream else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        if not body.get("stream"):
            out = [token async for token in naive.generate(model, prompt_ids, max_tokens, temperature, ignore_eos)]
            text = naive.decode(out)
            return {"id": rid, "object": kind, "created": created, "model": model,
                    "choices": [choice(text, "length" if len(out) >= max_tokens else "stop", False)],
                    "usage": usage(len(out))}  # fmt: skip

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        async def events():
            tokens: list[int] = []
            sent = ""
            async for token in naive.generate(model, prompt_ids, max_tokens, temperature, ignore_eos):
                tokens.append(token)
                text = naive.decode(tokens)
                delta, sent = text[len(sent) :], text
                chunk = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                         "choices": [choice(delta, None, True)]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            finish = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                      "choices": [choice("", "length" if len(tokens) >= max_tokens else "stop", True)]}  # fmt: skip
            yield f"data: {json.dumps(finish)}\n\n"
            if include_usage:
                last = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [],
                        "usage": usage(len(tokens))}  # fmt: skip
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def main() -> None:
    import uvicorn

    from serving.config import load_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="loraserve YAML config (model and adapters)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    settings = load_settings(args.config)
    uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
