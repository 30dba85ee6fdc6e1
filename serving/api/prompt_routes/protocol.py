"""Models of /admin/routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from routing.config import KeywordRule


class RouteCard(BaseModel):
    """A route as the prompt router uses it; ``threshold`` is the effective one."""

    name: str
    adapter: str
    utterances: list[str]
    keywords: list[KeywordRule]
    threshold: float
    tenant: str | None = None


class RouteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RouteCard]


class RouteDeleted(BaseModel):
    name: str
    deleted: Literal[True] = True
