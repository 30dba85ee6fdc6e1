"""Build the local demo model tree: one tiny BitNet b1.58 base model and three LoRA adapters.

The demo, ``make serve`` and the test suites need a real base model with real
adapters whose effect is visible, on machines that cannot reach a model hub.
So everything is trained here, from the corpora shipped in ``data/``, in about
a minute of one CPU core, and reproducibly: two builds give byte-identical
weights.

The base is the project's base architecture, BitNet b1.58, trained
quantization-aware and stored like ``microsoft/bitnet-b1.58-2B-4T``: ternary
projections packed four to a byte with one β per matrix (``autobitlinear``,
offline), bf16 embeddings and norms. The adapters are ordinary PEFT LoRA dirs,
trained on the online (float-master) twin of the same weights.

Layout under ``root``::

    base/                  Hugging Face model dir (config, packed safetensors, tokenizer)
    adapters/<name>/       PEFT LoRA dir, one per name in DEMO_ADAPTERS
    MANIFEST.json          written last; its presence means the tree is complete
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoints.corpus import corpus_digest

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEMO_BASE_NAME = "loraserve-demo-base"
"""Served model name, and ``base_model_name_or_path`` of every adapter (path-independent)."""

DEMO_ADAPTERS: tuple[str, ...] = ("code", "legal", "medical")

DOMAIN_KEYWORDS: dict[str, tuple[str, ...]] = {
    "code": (
        "def", "return", "returns", "import", "function", "variable", "loop", "list", "test",
        "error", "commit", "git", "class", "module", "value", "string", "raise", "dict", "args",
    ),
    "legal": (
        "party", "parties", "agreement", "clause", "shall", "hereinafter", "pursuant", "indemnify",
        "liability", "liable", "governing", "law", "herein", "hereto", "hereunder", "thereof",
        "breach", "termination", "obligations", "notice",
    ),
    "medical": (
        "patient", "presents", "diagnosis", "mg", "dosage", "dose", "symptoms", "treatment",
        "blood", "pressure", "prescribed", "daily", "pain", "history", "examination",
        "referred", "medication", "fever", "clinic", "admitted",
    ),
}  # fmt: skip
"""Lowercase words that mark a domain; tests count them in generated text."""

BUILD_FORMAT_VERSION = 4
"""Bump whenever the builder's output changes, so existing trees are rebuilt (2: BitNet base;
3: a shorter recipe, 900 training steps instead of 1500; 4: 975 steps, 175 per adapter)."""

BASE_LAYOUT = "autobitlinear"
"""The packed layout of ``checkpoints.tiny_bitnet.LAYOUTS`` the base is saved in."""

MANIFEST_NAME = "MANIFEST.json"

BUILD_THREADS = 1
"""Torch threads for training. The matrices are tiny (batch 4 x 128 tokens, width 128), so a
second thread buys little on an idle machine, while on a shared one the threads' barriers
cost everything: measured on this 2-core machine under load, 0.34 s per training step with
one thread against 6.7 s with two. One thread also makes the bytes independent of the core count."""


@dataclass(frozen=True)
class DemoAssets:
    """Where a built demo tree keeps its base model and adapters."""

    root: Path
    base: Path
    adapters: dict[str, Path]

    @classmethod
    def at(cls, root: Path) -> DemoAssets:
        """The layout under ``root``; says nothing about whether it is built."""
        return cls(
            root=root,
            base=root / "base",
            adapters={name: root / "adapters" / name for name in DEMO_ADAPTERS},
        )


def demo_assets_ready(root: Path) -> bool:
    """True when ``root`` holds a complete tree from this builder version and corpora.

    Cheap (no torch import), so callers can check before paying for a build.
    """
    try:
        manifest = json.loads((Path(root) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != BUILD_FORMAT_VERSION:
        return False
    if manifest.get("corpus_digest") != corpus_digest():
        return False
    files = manifest.get("files", {})
    return bool(files) and all(_size(Path(root) / rel) == size for rel, size in files.items())


def build_demo_assets(root: Path, *, force: bool = False) -> DemoAssets:
    """Build the demo tree under ``root`` unless a ready one is there already.

    Idempotent: with a ready tree and ``force=False`` nothing is touched. A
    build is staged in a temp dir next to ``root`` and renamed into place, and
    concurrent callers (parallel test sessions, ``make serve``) serialise on a
    lock file, so no one ever sees a half-written tree. ``root`` belongs to
    the builder: a tree there that is not ready is replaced wholesale.
    """
    root = Path(root).absolute()
    assets = DemoAssets.at(root)
    if not force and demo_assets_ready(root):
        return assets
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if not force and demo_assets_ready(root):
            logger.info("demo assets at %s were built by another process", root)
            return assets
        _remove_leftovers(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            started = time.monotonic()
            _build_into(staging)
            _swap_into_place(staging, root)
            logger.info("built demo assets at %s in %.1fs", root, time.monotonic() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return assets


def _build_into(staging: Path) -> None:
    """Train and save everything into ``staging``; the manifest goes last."""
    # Imported here so that readiness checks and ready trees never pay for torch.
    import torch

    from checkpoints.tokenizer import train_tokenizer
    from checkpoints.training import train_adapter, train_base

    # Training seeds torch's global RNG; callers (test sessions) keep their own state.
    with torch.random.fork_rng(), _torch_threads(BUILD_THREADS):
        tokenizer = train_tokenizer()
        masters = train_base(tokenizer)
        layout = DemoAssets.at(staging)
        _save_base(masters, tokenizer, layout.base)
        for name in DEMO_ADAPTERS:
            _save_adapter(train_adapter(masters, tokenizer, name), layout.adapters[name])
    _write_manifest(staging)


def _save_base(masters: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Write the packed checkpoint with ``checkpoints.tiny_bitnet``'s writer, plus a generation config.

    The writer also saves the tokenizer with its chat template inline in
    ``tokenizer_config.json``, where every reader (vLLM included) looks for it.
    """
    from transformers import GenerationConfig

    from checkpoints.tiny_bitnet import save_checkpoint
    from checkpoints.training import base_config

    config = base_config(tokenizer)
    save_checkpoint(path, config, masters, BASE_LAYOUT, tokenizer)
    GenerationConfig.from_model_config(config).save_pretrained(path)


def _save_adapter(model: PeftModel, path: Path) -> None:
    """Save a LoRA as safetensors, naming the base by name rather than by build path."""
    model.peft_config["default"].base_model_name_or_path = DEMO_BASE_NAME
    # Embeddings are never trained or resized; "auto" would look the base name up on the Hub.
    model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
    # PEFT adds a model card that records the training-time path; the tree is path-independent.
    (path / "README.md").unlink(missing_ok=True)


def _write_manifest(root: Path) -> None:
    """Record every file and its size, atomically (temp file + rename)."""
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "format_version": BUILD_FORMAT_VERSION,
        "corpus_digest": corpus_digest(),
        "base_name": DEMO_BASE_NAME,
        "adapters": list(DEMO_ADAPTERS),
        "files": files,
    }
    tmp = root / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def _swap_into_place(staging: Path, root: Path) -> None:
    """Rename ``staging`` to ``root``, moving any previous tree aside first.

    A directory cannot be renamed over a non-empty one, so an old tree is
    renamed out of the way and deleted only once the new one is in place.
    """
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / root.name)
    os.replace(staging, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Delete staging and old trees that a killed build left next to ``root``.

    Only called under the build lock, when no other build can be using them.
    """
    for pattern in (f".{root.name}.build-*", f".{root.name}.old-*"):
        for leftover in root.parent.glob(pattern):
            logger.info("removing leftover %s from an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _size(path: Path) -> int | None:
    """File size, or None when the file is missing."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None
