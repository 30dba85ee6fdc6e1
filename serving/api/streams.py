"""Async stream helpers: merging per-prompt engine streams, SSE framing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from pydantic import BaseModel

T = TypeVar("T")


async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Yield ``(stream index, item)`` from several streams as items arrive.

    Closing the merged iterator (client gone) cancels every pump, and with it
    the engine requests behind them.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    # An item with its stream's index; an exception (re-raised by the consumer); None: a stream ended.
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as e:
            await queue.put(e)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            entry = await queue.get()
            if entry is None:
                remaining -= 1
            elif isinstance(entry, BaseException):
                raise entry
            else:
                yield entry
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
