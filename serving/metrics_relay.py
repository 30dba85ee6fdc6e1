"""``loraserve metrics-relay``: the server's /metrics for a scraper that cannot send an API key.

The Gateway API Inference Extension's endpoint picker scrapes every server pod
for its queue, KV-cache and LoRA metrics, but has no way to send a bearer token
(no flag or plugin parameter in any release up to v1.5.0, nor in llm-d-router,
where the picker moved after). With API keys on, the server's /metrics needs a
metrics key, because its series name every adapter, private ones included.

The relay runs beside the server, in its pod: it answers ``GET /metrics`` on its
own port by fetching the server's /metrics with the metrics key, read from a
file (a mounted Secret; read on every scrape, so a rotated key is picked up),
and answers nothing else. Who may reach its port is decided by the network:
the Kubernetes manifests' NetworkPolicy admits only the picker's pods to it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Response

from serving.api.errors import EngineUnavailableError, install_error_handlers

logger = logging.getLogger(__name__)

MAX_METRICS_BYTES = 32 << 20  # far above a scrape of hundreds of adapters; a bound on what is buffered
SCRAPE_TIMEOUT_S = 10.0


def build_relay(upstream: str, token_file: Path) -> FastAPI:
    """An app with one route, ``GET /metrics``, relayed to ``upstream`` with the key in ``token_file``."""
    client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="loraserve metrics relay", openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/metrics")
    async def metrics() -> Response:
        headers = {"Authorization": f"Bearer {_token(token_file)}"}
        try:
            async with client.stream("GET", upstream, headers=headers) as response:
                body = await _read_capped(response)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"The server's /metrics did not answer: {type(e).__name__}.") from e
        media_type = response.headers.get("content-type")
        return Response(body, status_code=response.status_code, media_type=media_type)

    return app


def _token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise EngineUnavailableError(f"The relay cannot read its metrics key file: {e.strerror}.") from e
    if not token:
        raise EngineUnavailableError("The relay's metrics key file is empty.")
    return token


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_METRICS_BYTES:
            raise EngineUnavailableError(f"The server's /metrics is larger than {MAX_METRICS_BYTES} bytes.")
    return bytes(body)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_relay(args.upstream, args.token_file), host=args.host, port=args.port, log_level="warning")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    relay = commands.add_parser(
        "metrics-relay", help="serve the server's /metrics, fetched with a metrics key, to a scraper without one"
    )
    relay.add_argument("--upstream", default="http://127.0.0.1:8000/metrics", help="the server's /metrics URL")
    relay.add_argument("--token-file", type=Path, required=True, help="file holding the metrics key (a Secret)")
    relay.add_argument("--host", default="0.0.0.0", help="address to listen on")
    relay.add_argument("--port", type=int, default=9400, help="port to listen on")
    relay.set_defaults(handler=_run)
