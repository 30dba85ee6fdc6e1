"""The sparse half of hybrid scoring: TF-IDF cosine between the prompt and each route.

Fitted on the routes' own utterances and keyword patterns (no corpus, nothing
downloaded), so words that name one domain and no other weigh the most.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9][a-z0-9+#._-]*[a-z0-9+#]|[a-z0-9]")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "that",
        "the",
        "this",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


class TfidfIndex:
    """One sublinear TF-IDF document per route; ``scores`` gives the cosine to each."""

    def __init__(self, documents: Sequence[str]) -> None:
        docs = [Counter(tokens(d)) for d in documents]
        vocabulary = sorted({t for d in docs for t in d})
        self._index = {t: i for i, t in enumerate(vocabulary)}
        n = len(docs)
        df = Counter(t for d in docs for t in d)
        self._idf = np.array([math.log((1 + n) / (1 + df[t])) + 1.0 for t in vocabulary], dtype=np.float32)
        self._matrix = np.stack([self._vector(d) for d in docs]) if docs else np.zeros((0, len(vocabulary)), np.float32)

    def _vector(self, counts: Counter) -> np.ndarray:
        v = np.zeros(len(self._index), dtype=np.float32)
        for token, count in counts.items():
            i = self._index.get(token)
            if i is not None:
                v[i] = (1.0 + math.log(count)) * self._idf[i]
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def scores(self, text: str) -> np.ndarray:
        """Cosine of ``text`` to every route document, in document order."""
        if self._matrix.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        return self._matrix @ self._vector(Counter(tokens(text)))
