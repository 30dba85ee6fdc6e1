"""Models of /v1/models (OpenAI's shape plus vLLM's ``root``/``parent``, and each adapter's version)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from serving.api.adapter_info import AdapterInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    adapter: AdapterInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
