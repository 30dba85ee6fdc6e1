"""Models of /v1/adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adapter_store import NAME_PATTERN
from serving.api.adapter_info import AdapterInfo
from serving.config import TENANT_PATTERN

TAG_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class RegisterRequest(BaseModel):
    """Register the adapter at ``source`` (a path under a configured root, or an allowed s3:// URL)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Adapter name; a new version if the name exists.")
    source: str = Field(min_length=1, max_length=2048, description="Absolute path, file:// or s3:// URI.")
    aliases: list[str] = Field(default=[], max_length=16, description="Aliases to point at the new version.")
    tags: dict[str, str] = Field(default={}, max_length=32, description="Free-form labels kept with the version.")
    tenant: str | None = Field(
        default=None,
        pattern=TENANT_PATTERN,
        description="Owning tenant; null: public. Set by the name's first registration; later versions must match (409).",
    )
    check: bool = Field(default=True, description="Load it and generate a few tokens before answering.")


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=128, description="A version (or unique prefix) or another alias.")


class HealthView(BaseModel):
    name: str
    version: str
    state: Literal["ok", "failed", "unchecked"]
    reason: str | None = None
    checked_at: float | None = None
    latency_s: float | None = None


class VersionView(BaseModel):
    name: str
    id: str = Field(description="name@version: what a request's `model` field may name.")
    source: str
    pinned: bool
    cached: bool = Field(description="Files in the local disk cache.")
    loaded: bool = Field(description="In the engine's host-memory adapter cache.")
    info: AdapterInfo


class AdapterView(BaseModel):
    name: str
    tenant: str | None
    aliases: dict[str, str]
    versions: list[VersionView]


class SizeView(BaseModel):
    value: int | str
    source: Literal["configured", "derived"]
    reason: str = Field(description="Why the value is what it is: the config key, or the rule that derived it.")


class MemoryView(BaseModel):
    """How ``store.memory_budget_bytes`` is spent (serving/sizing.py): costs per unit, worst case at max rank."""

    budget_bytes: int
    adapter_bytes: int = Field(description="One adapter in the engine's host cache.")
    slot_buffer_bytes: int = Field(description="vLLM's buffers of one LoRA slot in host memory (0: GPU memory).")
    slot_copy_bytes: int = Field(description="The CPU LoRA ops' adapter forms of one slot (0 on a GPU).")
    shared_copy_bytes: int = Field(
        description="The CPU LoRA ops' copies bounded per linear, not per slot, all layers (0 on a GPU; with their "
        "per-token kernel only the forms built ahead of activation)."
    )
    parts: dict[str, int] = Field(
        description="Bytes of slot_buffers, slot_copies, host_cache, the CPU LoRA ops' scratch (with their per-token "
        "kernel: its tables), primitives (0 with it) and shared copies, and unused: they sum to the budget."
    )


class CacheView(BaseModel):
    disk_bytes: int = Field(description="Bytes under the disk cache directory, measured (at most 1 s ago).")
    disk_budget_bytes: int
    max_loras: int
    max_cpu_loras: int
    loaded: list[str] = Field(description="name@version of each adapter in the engine's host cache, as it reports.")
    sizing: dict[str, SizeView] = Field(
        description="model.dtype, engine.max_loras and engine.max_cpu_loras as the engine runs them (serving/sizing.py)."
    )
    memory: MemoryView | None = Field(description="The memory budget's split; null without store.memory_budget_bytes.")


LIST_PAGE_SIZE = 100
MAX_LIST_PAGE_SIZE = 1000


class AdapterList(BaseModel):
    """One page of adapters in name order (OpenAI's list shape); ``after=<last_id>`` asks for the next."""

    object: Literal["list"] = "list"
    data: list[AdapterView]
    first_id: str | None = Field(description="The page's first adapter name; null on an empty page.")
    last_id: str | None = Field(description="The page's last adapter name: pass it as `after` for the next page.")
    has_more: bool = Field(description="Whether adapters follow this page.")
    cache: CacheView


class UnloadResult(BaseModel):
    id: str
    unloaded: bool = Field(description="False if the engine did not hold it.")


class DeleteResult(BaseModel):
    id: str
    deleted: Literal[True] = True
