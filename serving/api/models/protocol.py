"""Models of /v1/models (OpenAI's shape plus vLLM's ``root``/``parent``, and each adapter's version)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class AdapterInfo(BaseModel):
    """What the store knows of the version a bare adapter name serves (its ``latest``)."""

    version: str  # sha256 of the files
    aliases: list[str]
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    created: int
    checksum: str
    tags: dict[str, str]
    health: Literal["ok", "failed", "unchecked"]


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
