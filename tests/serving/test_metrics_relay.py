"""The metrics relay against a real HTTP upstream (a stand-in for the server's /metrics).

The relay sends the key from its file, relays status and body, answers
nothing but GET /metrics, and bounds what it buffers. Through the real server:
tests/e2e/test_security_metrics.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serving import metrics_relay
from serving.metrics_relay import build_relay

TOKEN = "sk-ls-scraper"


class _Upstream(BaseHTTPRequestHandler):
    body = b"vllm:num_requests_waiting 0\n"

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        body = self.body if ok else b'{"error": {"message": "no", "type": "t", "param": null, "code": "c"}}'
        self.send_response(200 if ok else 403)
        self.send_header("Content-Type", "text/plain; version=0.0.4" if ok else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    # shutdown() waits for the loop's next poll: 0.5 s by default, most of each test's time
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


async def get(upstream: str, token_file: Path, method: str = "GET", path: str = "/metrics") -> httpx.Response:
    transport = httpx.ASGITransport(app=build_relay(upstream, token_file))
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        return await client.request(method, path)


async def test_relays_the_metrics_with_the_key(upstream, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")  # a trailing newline, as `kubectl create secret --from-file` keeps
    response = await get(upstream, tmp_path / "token")
    assert response.status_code == 200
    assert response.text == _Upstream.body.decode()
    assert response.headers["content-type"].startswith("text/plain")


async def test_a_wrong_key_is_the_servers_answer(upstream, tmp_path):
    (tmp_path / "token").write_text("sk-ls-user")
    response = await get(upstream, tmp_path / "token")
    assert response.status_code == 403 and response.json()["error"]["code"] == "c"


@pytest.mark.parametrize(("method", "path", "status"), [("POST", "/metrics", 405), ("GET", "/v1/models", 404)])
async def test_answers_nothing_else(upstream, tmp_path, method, path, status):
    (tmp_path / "token").write_text(TOKEN)
    response = await get(upstream, tmp_path / "token", method, path)
    assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_missing_key_file_or_dead_upstream_is_a_503(upstream, tmp_path):
    missing = await get(upstream, tmp_path / "absent")
    assert missing.status_code == 503 and "key file" in missing.json()["error"]["message"]
    (tmp_path / "token").write_text(TOKEN)
    dead = await get("http://127.0.0.1:9/metrics", tmp_path / "token")
    assert dead.status_code == 503 and "did not answer" in dead.json()["error"]["message"]


async def test_buffers_at_most_the_cap(upstream, tmp_path, monkeypatch):
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setattr(metrics_relay, "MAX_METRICS_BYTES", len(_Upstream.body) - 1)
    response = await get(upstream, tmp_path / "token")
    assert response.status_code == 503 and "larger than" in response.json()["error"]["message"]
