"""The one settings model: loaded from YAML, validated at start-up, injected.

Relative paths in a config file are resolved against the directory of that
file, so a config works the same from any working directory. Secrets never
live here; later settings refer to the environment variable or file that
holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapter_store import NAME_PATTERN as ADAPTER_NAME_PATTERN
from adapter_store import StoreSettings
from routing.config import RoutingSettings

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DType = Literal["auto", "bfloat16", "float16", "float32"]


class ConfigError(Exception):
    """A configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    """Unknown keys are typos: refuse them instead of ignoring them."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Strict):
    """The base model, loaded once."""

    path: Path = Field(description="Hugging Face model directory (local; nothing is downloaded).")
    name: str = Field(description="Name clients use in the `model` field for the base model.")
    tokenizer: Path | None = Field(default=None, description="Tokenizer directory; defaults to `path`.")
    dtype: DType = Field(
        default="auto",
        description="auto: bfloat16 on a CPU with native bf16 (avx512_bf16, amx_bf16), else float32; "
        "on a GPU, vLLM's auto (the checkpoint's dtype). See serving/sizing.py.",
    )
    max_model_len: int = Field(default=2048, gt=0, description="Context window (prompt + output tokens).")


class EngineSettings(_Strict):
    """Every vLLM engine knob the server sets; nothing is inherited from vLLM defaults."""

    max_loras: int | None = Field(
        default=None,
        ge=1,
        description="Adapters in one batch (GPU/CPU slots); null: a full batch (max_num_seqs) within host and GPU "
        "memory (serving/sizing.py).",
    )
    max_lora_rank: int = Field(default=16, ge=1, le=512, description="Largest adapter rank served.")
    max_cpu_loras: int | None = Field(default=None, ge=1, description="Adapters kept in host memory; >= max_loras.")
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences scheduled in one step.")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="Tokens scheduled in one step.")
    kv_cache_gib: float | None = Field(
        default=2.0, gt=0, description="KV-cache size in GiB (host memory on the CPU); null: derive it on the GPU."
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="GPU only: memory fraction.")
    lora_gpu_memory_fraction: float = Field(
        default=0.05,
        gt=0,
        le=0.5,
        description="GPU only, max_loras left out: share of the memory vLLM may use that the LoRA slots may take.",
    )
    lora_max_overtakes: int | None = Field(
        default=64,
        ge=0,
        description="Fair slots (serving/lora_scheduler.py): a request whose adapter has no slot lets at most this "
        "many younger adapter requests pass it before one slot holder is drained for it (64: about one full batch "
        "at the default max_num_seqs; 0: never overtaken, at a throughput cost). null: vLLM's own scheduler, "
        "under which such a request waits as long as the slot holders' traffic lasts.",
    )
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _cpu_loras_hold_the_slots(self) -> EngineSettings:
        if self.max_cpu_loras is not None and self.max_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                "every adapter in a GPU/CPU slot is also held in the host cache"
            )
        return self


class AdapterSettings(_Strict):
    """One LoRA adapter served by name."""

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    path: Path = Field(description="PEFT adapter directory (adapter_config.json + safetensors).")
    tenant: str | None = Field(
        default=None, pattern=TENANT_PATTERN, description="Owning tenant; only its keys see and use it. Null: public."
    )


class AuthSettings(_Strict):
    """Who may call the API. ``open`` must be chosen explicitly; it is logged as a warning."""

    mode: Literal["open", "api_keys"]
    keys_file: Path | None = Field(
        default=None, description="YAML file of hashed keys (`loraserve keys new` writes it); api_keys mode."
    )
    keys_env: str | None = Field(
        default=None, description="Name of an environment variable holding the same YAML document instead."
    )

    @model_validator(mode="after")
    def _keys_source(self) -> AuthSettings:
        sources = (self.keys_file is not None) + (self.keys_env is not None)
        if self.mode == "api_keys" and sources != 1:
            raise ValueError("auth.mode api_keys needs exactly one of auth.keys_file or auth.keys_env")
        if self.mode == "open" and sources:
            raise ValueError("auth.mode open takes no keys; set auth.mode: api_keys to use them")
        return self


class RateSettings(_Strict):
    """A token bucket per API key: ``burst`` tokens at once, refilled at ``per_minute``.

    A generation request takes one token per sequence (prompts x n); an upload takes one.
    """

    per_minute: float = Field(gt=0, description="Sustained tokens (sequences, uploads) per minute per key.")
    burst: int = Field(ge=1, description="Tokens a key may spend at once after being idle.")


class LimitSettings(_Strict):
    """Bounds that keep one client from hurting the others; each breach is a 4xx or a 503."""

    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="Largest request body (413 beyond).")
    max_upload_bytes: int = Field(
        default=64 << 20,
        ge=1024,
        description="Largest adapter upload (multipart body) to /v1/adapters/{name}/versions.",
    )
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="Prompt tokens per prompt; null: context.")
    max_tokens: int | None = Field(default=None, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(default=16, ge=1, le=16, description="Largest n (choices per prompt); the API caps it at 16.")
    max_prompts_per_request: int = Field(
        default=64, ge=1, le=2048, description="Prompts in one completions request (a list); the API caps it at 2048."
    )
    max_stop: int = Field(default=16, ge=0, le=64, description="Stop strings per request; the API caps it at 64.")
    max_stop_chars: int = Field(
        default=256, ge=1, le=1024, description="Characters per stop string; the API caps it at 1024."
    )
    max_concurrent_per_key: int | None = Field(
        default=None, ge=1, description="Sequences (prompts x n) in flight per key (429)."
    )
    rate: RateSettings | None = Field(
        default=None, description="Token bucket per key; a request takes one token per sequence (prompts x n)."
    )
    max_rate_buckets: int = Field(
        default=10_000,
        ge=1,
        description="Token buckets kept (per key; per client address in open mode); full ones are dropped first.",
    )
    upload_rate: RateSettings = Field(
        default=RateSettings(per_minute=30, burst=10),
        description="Token bucket per key for adapter uploads (429 beyond).",
    )
    max_queued_requests: int = Field(
        default=256, ge=0, description="Sequences admitted beyond engine.max_num_seqs before new requests get 503."
    )


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: float = Field(
        default=60, ge=0, description="On SIGTERM, time in-flight requests get to finish before they are cut."
    )
    keep_alive_s: float = Field(
        default=75,
        gt=0,
        description="How long an idle keep-alive connection stays open. Longer than clients' pool expiry (httpx, "
        "so the OpenAI SDK: 5 s) and load balancers' idle timeouts (60 s), so the server never closes a "
        "connection a client is about to reuse (uvicorn's 5 s default races httpx's 5 s: a reset request).",
    )


class Settings(_Strict):
    """Root of the YAML file."""

    model: ModelSettings
    auth: AuthSettings
    engine: EngineSettings = EngineSettings()
    adapters: list[AdapterSettings] = []
    limits: LimitSettings = LimitSettings()
    store: StoreSettings | None = Field(
        default=None, description="Adapter store (registry, sources, disk cache); absent: a temporary one."
    )
    server: ServerSettings = ServerSettings()
    routing: RoutingSettings | None = Field(default=None, description="Prompt-based adapter routing (`model: auto`).")

    @model_validator(mode="after")
    def _names_are_unique(self) -> Settings:
        seen: set[str] = {self.model.name}
        if self.routing is not None:
            if self.routing.auto_model == self.model.name:
                raise ValueError(f"routing.auto_model {self.routing.auto_model!r} must differ from model.name")
            seen.add(self.routing.auto_model)
        for i, adapter in enumerate(self.adapters):
            if adapter.name in seen:
                raise ValueError(
                    f"adapters[{i}].name {adapter.name!r} is used twice (or equals model.name or routing.auto_model): "
                    "every adapter needs its own name"
                )
            seen.add(adapter.name)
        return self

    def check_files(self) -> None:
        """Fail at start-up, naming the key, when a configured path does not exist."""
        checks = [("model.path", self.model.path / "config.json")]
        if self.model.tokenizer is not None:
            checks.append(("model.tokenizer", self.model.tokenizer))
        if self.auth.keys_file is not None:
            checks.append(("auth.keys_file", self.auth.keys_file))
        for i, adapter in enumerate(self.adapters):
            checks.append((f"adapters[{i}].path", adapter.path / "adapter_config.json"))
        if self.routing is not None and self.routing.routes_file is not None:
            checks.append(("routing.routes_file", self.routing.routes_file))
        missing = [f"  {key}: {path} does not exist" for key, path in checks if not path.exists()]
        if missing:
            raise ConfigError("config refers to missing files:\n" + "\n".join(missing))


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    """Make relative paths absolute against the config file's directory."""

    def resolve(value: object) -> object:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base_dir / value).resolve())
        return value

    model = raw.get("model")
    if isinstance(model, dict):
        for key in ("path", "tokenizer"):
            if key in model:
                model[key] = resolve(model[key])
    for adapter in raw.get("adapters") or []:
        if isinstance(adapter, dict) and "path" in adapter:
            adapter["path"] = resolve(adapter["path"])
    auth = raw.get("auth")
    if isinstance(auth, dict) and "keys_file" in auth:
        auth["keys_file"] = resolve(auth["keys_file"])
    store = raw.get("store")
    if isinstance(store, dict):
        if "root" in store:
            store["root"] = resolve(store["root"])
        for source in store.get("sources") or []:
            if isinstance(source, dict) and isinstance(source.get("roots"), list):
                source["roots"] = [resolve(r) for r in source["roots"]]
        uploads = store.get("uploads")
        if isinstance(uploads, dict) and "path" in uploads:
            uploads["path"] = resolve(uploads["path"])
    routing = raw.get("routing")
    if isinstance(routing, dict) and "routes_file" in routing:
        routing["routes_file"] = resolve(routing["routes_file"])
    return raw


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(root)"
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {key}: {item['msg']}{got}")
    return "\n".join(lines)


def parse_settings(raw: object, *, source: str = "<config>", base_dir: Path | None = None) -> Settings:
    """Validate an already-parsed YAML document; errors name the offending key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(raw).__name__}")
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from e


def load_settings(path: Path) -> Settings:
    """Read and validate a YAML config file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    return parse_settings(raw, source=str(path), base_dir=path.resolve().parent)
