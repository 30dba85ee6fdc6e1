"""merge_streams: interleaving, error propagation, cancellation of every source."""

from __future__ import annotations

import asyncio

import pytest

from serving.api.streams import merge_streams


async def numbers(start: int, count: int, delay: float, closed: list[int]):
    try:
        for i in range(start, start + count):
            await asyncio.sleep(delay)
            yield i
    finally:
        closed.append(start)


async def test_merges_every_item_with_its_source() -> None:
    closed: list[int] = []
    items = [x async for x in merge_streams([numbers(0, 3, 0.001, closed), numbers(100, 2, 0.0015, closed)])]
    assert sorted(items) == [(0, 0), (0, 1), (0, 2), (1, 100), (1, 101)]
    assert sorted(closed) == [0, 100]


async def test_closing_the_merge_cancels_every_source() -> None:
    closed: list[int] = []
    merged = merge_streams([numbers(0, 1000, 0.001, closed), numbers(100, 1000, 0.001, closed)])
    await anext(merged)
    await merged.aclose()
    assert sorted(closed) == [0, 100]


async def test_an_error_in_one_source_reaches_the_consumer() -> None:
    async def failing():
        yield 1
        raise ValueError("boom")

    closed: list[int] = []
    with pytest.raises(ValueError, match="boom"):
        async for _ in merge_streams([failing(), numbers(0, 1000, 0.001, closed)]):
            pass
    assert closed == [0]
