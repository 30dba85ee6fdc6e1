"""Adapter directories for the store's end-to-end tests, made from the demo adapters' real files.

Valid copies (optionally with rescaled weights, so each has its own content
digest) and one broken variant per validation failure. Nothing here depends
on the demo base's architecture: shapes and names come from the files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def copy_adapter(source: Path, dest: Path, *, scale: float | None = None) -> Path:
    """A copy of ``source``; with ``scale``, every lora_B is multiplied by it (new digest, new outputs)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / CONFIG, dest / CONFIG)
    if scale is None:
        shutil.copyfile(source / WEIGHTS, dest / WEIGHTS)
    else:
        tensors = {k: (v * scale if "lora_B" in k else v).contiguous() for k, v in load_file(source / WEIGHTS).items()}
        save_file(tensors, dest / WEIGHTS)
    return dest


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        config.update(changes)
        (d / CONFIG).write_text(json.dumps(config))

    return edit


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        save_file(fn(load_file(d / WEIGHTS)), d / WEIGHTS)

    return edit


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 8, dtype=tensors[name].dtype)
    return tensors


def _pickle(d: Path) -> None:
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))


def _truncate(d: Path) -> None:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


# name -> (how to break a valid copy, the reason code the server must answer with)
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "pickle_weights": (_pickle, "pickle_weights"),
    "rank_too_large": (_edit_config(r=64, lora_alpha=128), "rank_too_large"),
    "wrong_base_model": (_edit_config(base_model_name_or_path="meta-llama/Llama-3-8B"), "wrong_base_model"),
    "wrong_shape": (_edit_tensors(_wrong_shape), "wrong_shape"),
    "unknown_target_module": (_edit_config(target_modules=["q_proj", "frobnicator"]), "unknown_target_module"),
    "truncated_safetensors": (_truncate, "corrupt_weights"),
    "missing_config": (lambda d: (d / CONFIG).unlink(), "missing_config"),
}


def broken_adapter(source: Path, dest: Path, kind: str) -> Path:
    copy_adapter(source, dest)
    BROKEN[kind][0](dest)
    return dest


def nan_adapter(source: Path, dest: Path) -> Path:
    """Valid files whose weights are NaN: only generating with it (the health probe) shows it is unusable."""
    copy_adapter(source, dest)
    _edit_tensors(lambda t: {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in t.items()})(dest)
    return dest
