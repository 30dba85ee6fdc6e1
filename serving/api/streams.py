"""Async stream helpers: merging per-prompt engine streams, SSE framing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from pydantic import BaseModel

T = TypeVar("T")

_DONE = object()


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield ``(stream index, item)`` from several streams as items arrive.

    Closing the merged iterator (client gone) cancels every pump, and with it
    the engine requests behind them.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, object, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as e:  # handed to the consumer, which re-raises it
            await queue.put((index, None, e))
            return
        await queue.put((index, _DONE, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                remaining -= 1
                continue
            yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse_event(payload: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else _dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _dumps(payload: dict) -> str:
    import json

    return json.dumps(payload, separators=(",", ":"))
