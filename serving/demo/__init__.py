"""Deterministic, locally built demo assets: a tiny base model and three LoRA adapters."""

from serving.demo.assets import (
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
