"""Every model and adapter checkpoint the project builds itself, offline and deterministically.

Model hubs are out of reach on the machines this project is built and tested
on, so this package writes the checkpoints: the demo assets ``make serve``
runs (a tiny BitNet b1.58 base trained quantization-aware on the shipped
corpora, and three domain LoRA adapters trained with PEFT, ``assets`` and
``training``), tiny BitNet checkpoints in every published layout for tests
(``tiny_bitnet``), and synthetic Llama-shaped models and adapters for
benchmarks (``synthetic``). It is a build tool: the serving process imports it
only for ``loraserve demo-assets``, and it imports nothing of ``serving`` or
``loadtests`` (``tests/test_boundaries.py``).
"""

from checkpoints.assets import (
    DEMO_ADAPTERS,
    DEMO_BASE_NAME,
    DOMAIN_KEYWORDS,
    DemoAssets,
    build_demo_assets,
    demo_assets_ready,
)

__all__ = [
    "DEMO_ADAPTERS",
    "DEMO_BASE_NAME",
    "DOMAIN_KEYWORDS",
    "DemoAssets",
    "build_demo_assets",
    "demo_assets_ready",
]
