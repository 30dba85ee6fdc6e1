"""The fault checks: a server's engine killed under a stream, a server told to stop (SIGTERM) under a stream.

Both leave the server unusable, and a server start is the costliest step of
the suite, so the SIGTERM check runs where a server is replaced anyway: it is
how test_adapter_admin.py's restart test stops the ``admin`` server (a pod
told to stop). The engine-death check (test_faults.py) is the last job of
the session ``server``, after every other test of the run. Every wait polls
under a deadline, and the request that must be in flight when the fault hits
is seen running in the engine (/metrics) first.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer

STREAM_TOKENS = 300


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


def stream_body(model: str, max_tokens: int = STREAM_TOKENS) -> dict:
    return {
        "model": model,
        "prompt": "def main():",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def kill_the_engine_during_a_stream(server: RunningServer, model: str) -> None:
    """SIGKILL the engine core while a stream of ``model`` runs in it: /health turns 503 within 10 s, the stream
    ends (an error event or a closed connection) instead of hanging, and new requests get 503 within seconds."""
    engine_core = [pid for pid in children(server.process.pid) if process_name(pid).startswith("VLLM::EngineCor")]
    assert engine_core, [process_name(p) for p in children(server.process.pid)]
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=stream_body(model), timeout=60) as r:
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
    assert requests_running(server.url) == 1  # the stream is in the engine when it dies

    os.kill(engine_core[0], signal.SIGKILL)
    killed_at = time.monotonic()
    while httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
        assert time.monotonic() - killed_at < 10, "/health still 200 ten seconds after the engine died"
        time.sleep(0.2)
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"

    # The stream in flight ends (with an error event) instead of hanging.
    assert done.wait(timeout=15), "the in-flight stream hung after the engine died"
    reader.join()
    assert any('"error"' in e for e in events) or events[-1].startswith("transport error"), events[-3:]

    started = time.monotonic()
    for path, body in [
        ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 4}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}),
    ]:
        response = httpx.post(f"{server.url}{path}", json=body, timeout=15)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - started < 10


def sigterm_during_a_stream(server: RunningServer, model: str) -> None:
    """SIGTERM the server while a stream of ``model`` runs in the engine: it stops accepting connections at once,
    the stream still completes (every token, no error), and the server exits in order (its lifespan ran to the end)."""
    lines: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=stream_body(model), timeout=120) as r:
        assert r.status_code == 200
        chunks = r.iter_lines()
        lines.append(next(chunks))
        assert requests_running(server.url) == 1  # the stream is in the engine when the signal comes
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # uvicorn closes its listening socket at once
        while True:
            try:
                httpx.get(f"{server.url}/health", timeout=5)
            except httpx.ConnectError:
                break
            assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.05)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "x"}, timeout=5)
        lines += list(chunks)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == STREAM_TOKENS  # the whole stream, not a cut one
    # uvicorn re-raises the signal after its graceful shutdown, so the status is "killed by SIGTERM";
    # the log shows the lifespan ran to the end (engine shut down) first.
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
