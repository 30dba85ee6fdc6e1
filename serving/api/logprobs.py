"""Engine log-probabilities in the two OpenAI response shapes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from serving.api.chat.protocol import ChatLogprobs, ChatTokenLogprob, TopLogprob
from serving.api.completions.protocol import CompletionLogprobs

if TYPE_CHECKING:
    from vllm.logprobs import Logprob

# One engine position: token id → Logprob, holding the sampled token and the top-k.
Position = dict[int, "Logprob"]


def _finite(value: float) -> float:
    """JSON has no -inf; OpenAI clients expect a very negative number instead."""
    return value if math.isfinite(value) else -9999.0


def _token_text(token_id: int, entry: Logprob) -> str:
    return entry.decoded_token if entry.decoded_token is not None else f"<{token_id}>"


def _top(position: Position, k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank if item[1].rank is not None else 0)
    return ranked[:k]


def completion_logprobs(
    token_ids: list[int], positions: list[Position], k: int, text_offset_start: int
) -> CompletionLogprobs:
    """``logprobs`` of a completion choice: sampled token, its logprob, the top ``k``."""
    result = CompletionLogprobs()
    offset = text_offset_start
    for token_id, position in zip(token_ids, positions, strict=True):
        entry = position[token_id]
        text = _token_text(token_id, entry)
        result.tokens.append(text)
        result.token_logprobs.append(_finite(entry.logprob))
        result.top_logprobs.append({_token_text(t, e): _finite(e.logprob) for t, e in _top(position, k)} if k else None)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def chat_logprobs(token_ids: list[int], positions: list[Position], k: int) -> ChatLogprobs:
    """``logprobs`` of a chat choice: one entry per token with its top ``k``."""
    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        entry = position[token_id]
        text = _token_text(token_id, entry)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=_finite(entry.logprob),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=_token_text(t, e), logprob=_finite(e.logprob), bytes=list(_token_text(t, e).encode())
                    )
                    for t, e in _top(position, k)
                ],
            )
        )
    return ChatLogprobs(content=content)
