"""Real adapter files for the store's tests: PEFT's layout, safetensors weights, a tiny base config."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapter_store import AdapterStore, Claim, ServedAdapter
from adapter_store.registry import DB_NAME


@contextmanager
def no_upload_lock(uri: str) -> Iterator[Callable[[], bool]]:
    """The upload lock of a single writer with no registry: nothing else keeps or discards, nothing references."""
    yield lambda: False


BASE_NAME = "tiny-base"
BUCKET = "adapters"
# A Llama-shaped base with GQA, so q and k/v LoRA shapes differ (head_dim 64 as vLLM's CPU attention needs).
BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}
_SHAPES = {  # (in, out) for BASE_CONFIG
    "q_proj": (128, 128),
    "k_proj": (128, 64),
    "v_proj": (128, 64),
    "o_proj": (128, 128),
    "gate_proj": (128, 256),
    "up_proj": (128, 256),
    "down_proj": (256, 128),
}
_BLOCK = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for m in _SHAPES}


def write_base_config(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({**BASE_CONFIG, **overrides}))
    return path


def lora_tensors(
    rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), layers: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module in targets:
            fan_in, fan_out = _SHAPES.get(module, (128, 128))
            prefix = f"base_model.model.model.layers.{layer}.{_BLOCK.get(module, 'mlp')}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank), dtype=np.float32)
    return tensors


def write_adapter(
    directory: Path,
    *,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    base: str = BASE_NAME,
    seed: int = 0,
    tensors: dict[str, np.ndarray] | None = None,
    **config_overrides,
) -> Path:
    """A PEFT LoRA adapter directory as ``save_pretrained`` writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        **config_overrides,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        tensors if tensors is not None else lora_tensors(rank, targets, seed=seed),
        str(directory / "adapter_model.safetensors"),
    )
    return directory


def upload(endpoint: str, directory: Path, key_prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for path in directory.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, key_prefix + path.relative_to(directory).as_posix())


# The registry file as schema 1 (before owners on names and the current digest format) wrote it.
_V1_SCHEMA = """
CREATE TABLE adapters (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL REFERENCES adapters(name), digest TEXT NOT NULL,
    base_model TEXT NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, created_at REAL NOT NULL, source TEXT NOT NULL, tags TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, UNIQUE (name, digest)
);
CREATE TABLE aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, digest TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias), FOREIGN KEY (name, digest) REFERENCES versions(name, digest)
);
CREATE TABLE health (
    name TEXT NOT NULL, digest TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, checked_at REAL, latency_s REAL,
    PRIMARY KEY (name, digest), FOREIGN KEY (name, digest) REFERENCES versions(name, digest) ON DELETE CASCADE
);
"""


def write_v1_registry(root: Path, versions: list[tuple[str, str, str, dict]]) -> None:
    """A registry file as schema 1 wrote it; ``versions`` are (name, digest, source, tags), oldest first."""
    root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(root / DB_NAME)
    conn.executescript(_V1_SCHEMA)
    for seq, (name, version, source, tags) in enumerate(versions):
        conn.execute("INSERT OR IGNORE INTO adapters VALUES (?, ?)", (name, seq))
        conn.execute(
            "INSERT INTO versions (name, digest, base_model, rank, alpha, target_modules, size_bytes, created_at, "
            "source, tags) VALUES (?, ?, 'base', 8, 16.0, '[\"q_proj\"]', 10, ?, ?, ?)",
            (name, version, seq, source, json.dumps(tags)),
        )
        conn.execute("INSERT OR REPLACE INTO aliases VALUES (?, 'latest', ?, ?)", (name, version, seq))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


@contextmanager
def lease(store: AdapterStore, ref: str, *, register_for: Claim | None = None) -> Iterator[ServedAdapter]:
    """``ref``'s files for the block, as a request holds them: resolve, acquire, release."""
    adapter = store.acquire(store.version(ref, register_for=register_for))
    try:
        yield adapter
    finally:
        store.release(adapter)


def set_aside(root: Path) -> Path:
    """``root``, a store a module's tests all start from, built there and moved aside for :func:`copy_back`."""
    return root.rename(root.with_name(f"{root.name}-built"))


@contextmanager
def copy_back(built: Path) -> Iterator[Path]:
    """A copy of a store :func:`set_aside` at the path it was built at, removed after the test.

    The same path, because the registry keeps its sources' absolute paths: a test opening the copy gets a store as
    fresh as one it built itself, without a new registry's tables and the registrations each time."""
    root = built.with_name(built.name.removesuffix("-built"))
    shutil.copytree(built, root)
    try:
        yield root
    finally:
        shutil.rmtree(root)
