"""The engine's log-probabilities as plain data, for each endpoint to put in its own response shape.

The completion and chat formats differ (parallel lists against one entry per
token); each lives with its endpoint's protocol. What they share is read here:
the sampled token's text and log-probability, and its top ``k`` alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.logprobs import Logprob, SampleLogprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability and the top ``k`` ``(text, logprob)`` by rank."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


def _finite(value: float) -> float:
    """JSON has no -inf; OpenAI clients expect a very negative number instead."""
    return value if math.isfinite(value) else -9999.0


def _token_text(token_id: int, entry: Logprob) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"<{token_id}>"


def token_logprobs(token_ids: list[int], positions: SampleLogprobs, k: int) -> list[TokenLogprob]:
    """Each sampled token of an output with its top ``k`` alternatives (``k`` = 0: none).

    ``positions`` holds, per generated token, token id → ``Logprob`` for the
    sampled token and the top ``k`` (vLLM's list of dicts, or its flat form).
    """
    tokens = []
    for token_id, position in zip(token_ids, positions, strict=True):
        if position is None:  # vLLM leaves only a prompt's first position empty, never a sampled one
            raise ValueError(f"the engine returned no logprobs for sampled token {token_id}")
        entry = position[token_id]
        ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 0)
        top = [(_token_text(t, e), _finite(e.logprob)) for t, e in ranked[:k]]
        tokens.append(TokenLogprob(_token_text(token_id, entry), _finite(entry.logprob), top))
    return tokens
