"""Where a prompt is tokenized: short ones on the event loop (a thread hop costs more), long ones in a thread."""

from __future__ import annotations

import threading

import pytest

from serving.api.completions.serving import prompt_size
from serving.api.generation import INLINE_PROMPT_SIZE, GenerationServing


@pytest.mark.parametrize(
    ("size", "inline"), [(0, True), (INLINE_PROMPT_SIZE, True), (INLINE_PROMPT_SIZE + 1, False), (10**6, False)]
)
async def test_short_prompts_are_tokenized_on_the_loop(size: int, inline: bool) -> None:
    ran_on = await GenerationServing.tokenize(threading.get_ident, size)
    assert (ran_on == threading.get_ident()) is inline


@pytest.mark.parametrize(
    ("prompt", "size"),
    [("abc", 3), (["ab", "cde"], 5), ([1, 2, 3], 3), ([[1, 2], [3]], 3), ("x" * 600, 600)],
)
def test_prompt_size_counts_characters_or_token_ids(prompt, size: int) -> None:
    assert prompt_size(prompt) == size
