"""Fault tests: the engine dies, the pod is told to stop.

Each test starts (and ends) its own server, since both leave it unusable.
Every wait polls under a deadline, and the request that must be in flight when
the fault hits is seen running in the engine (/metrics) first.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, demo_config, start_server, stop_server

STREAM_TOKENS = 300

pytestmark = pytest.mark.engine


def requests_running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running"))


def children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc; vLLM's engine core and workers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *children(int(child))]
    return found


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def stream_body(max_tokens: int = STREAM_TOKENS) -> dict:
    return {
        "model": "code",
        "prompt": "def main():",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.fixture
def own_server(demo_assets, tmp_path) -> Iterator[RunningServer]:
    config = demo_config(demo_assets)
    config["routing"] = None  # not under test: no prompt-router encoder to load at each start
    config["server"]["shutdown_grace_s"] = 60
    server = start_server(config, tmp_path)
    yield server
    stop_server(server)


def test_engine_death_turns_health_red_and_requests_fail_fast(own_server):
    engine_core = [pid for pid in children(own_server.process.pid) if process_name(pid).startswith("VLLM::EngineCor")]
    assert engine_core, [process_name(p) for p in children(own_server.process.pid)]
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{own_server.url}/v1/completions", json=stream_body(), timeout=60) as r:
                for line in r.iter_lines():
                    events.append(line)
        except httpx.HTTPError as e:
            events.append(f"transport error: {type(e).__name__}")
        finally:
            done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 60
    while not any(e.startswith("data: {") for e in events):
        assert time.monotonic() < deadline and not done.is_set(), events
        time.sleep(0.05)
    assert requests_running(own_server.url) == 1  # the stream is in the engine when it dies

    os.kill(engine_core[0], signal.SIGKILL)
    killed_at = time.monotonic()
    while httpx.get(f"{own_server.url}/health", timeout=5).status_code == 200:
        assert time.monotonic() - killed_at < 10, "/health still 200 ten seconds after the engine died"
        time.sleep(0.2)
    health = httpx.get(f"{own_server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"

    # The stream in flight ends (with an error event) instead of hanging.
    assert done.wait(timeout=15), "the in-flight stream hung after the engine died"
    assert any('"error"' in e for e in events) or events[-1].startswith("transport error"), events[-3:]

    started = time.monotonic()
    for path, body in [
        ("/v1/completions", {"model": "code", "prompt": "x", "max_tokens": 4}),
        ("/v1/chat/completions", {"model": "legal", "messages": [{"role": "user", "content": "x"}]}),
    ]:
        response = httpx.post(f"{own_server.url}{path}", json=body, timeout=15)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - started < 10


def test_sigterm_lets_streams_finish_and_refuses_new_requests(own_server):
    lines: list[str] = []
    with httpx.stream("POST", f"{own_server.url}/v1/completions", json=stream_body(), timeout=120) as r:
        assert r.status_code == 200
        chunks = r.iter_lines()
        lines.append(next(chunks))
        assert requests_running(own_server.url) == 1  # the stream is in the engine when the signal comes
        own_server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # uvicorn closes its listening socket at once
        while True:
            try:
                httpx.get(f"{own_server.url}/health", timeout=5)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.05)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{own_server.url}/v1/completions", json={"model": "code", "prompt": "x"}, timeout=5)
        lines += list(chunks)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == STREAM_TOKENS  # the whole stream, not a cut one
    # uvicorn re-raises the signal after its graceful shutdown, so the status is "killed by SIGTERM";
    # the log shows the lifespan ran to the end (engine shut down) first.
    assert own_server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in own_server.log()
