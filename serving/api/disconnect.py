"""Stop engine work as soon as the client goes away.

A streaming response notices a closed connection when it writes; Starlette
then cancels the body iterator, and vLLM's ``generate`` aborts the request on
that cancellation. A non-streaming request writes nothing until the end, so
:func:`cancel_on_disconnect` races it against the ASGI ``http.disconnect``
message and cancels it first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Send

from serving.api.errors import ClientDisconnectedError, ServingError, internal_error
from serving.api.streams import SSE_DONE, sse_event

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it and raise :class:`ClientDisconnectedError` if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnectedError("The client closed the connection before the response was ready.")


async def event_stream(events: AsyncIterator[str], on_close: Callable[[], None]) -> StreamingResponse:
    """An SSE response whose first event is produced before the headers are sent.

    Errors found before the first event (engine down, ...) thus become normal
    JSON error responses with their status code; an error after that can only
    be reported in the stream, as a final ``{"error": ...}`` event.

    ``on_close`` runs once the stream ends, however it ends (finished, failed,
    client gone): it is called by the body and again as the response's
    background task, so it must be idempotent.
    """
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        yield first
        try:
            async for event in events:
                yield event
        except ServingError as e:
            yield sse_event(e.body())
            yield SSE_DONE
        except Exception as e:
            logger.exception("stream failed")
            yield sse_event(internal_error(e).body())
            yield SSE_DONE
        finally:
            on_close()

    async def close() -> None:  # async: Starlette runs a plain function's background task in a thread
        on_close()

    return EventStreamResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(close),
    )


class EventStreamResponse(StreamingResponse):
    """Starlette's streaming response, whose ``[DONE]`` event also ends the body: one write, not two.

    Starlette sends every item of the body, then an empty message to end it,
    each one a socket write. An SSE stream's last event is ``data: [DONE]``
    (a chunk's JSON cannot end that way: its newlines are escaped), so that
    item goes out as the end of the body, and the body iterator is closed
    (its ``finally`` runs) instead of being asked for an item it does not have.
    """

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
            last = isinstance(chunk, str) and chunk.endswith(SSE_DONE)
            await send({"type": "http.response.body", "body": data, "more_body": not last})
            if last:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
