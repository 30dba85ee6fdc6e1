"""The ``loraserve`` command line: a bad config stops start-up with the key named."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serving.cli import main
from tests.conftest import ENGINE_PROCESS_TITLE, demo_config

REPO = Path(__file__).resolve().parents[2]
# Well under an engine start (~40 s for the demo on two idle cores, more under load): time to stop what started.
STOP_DURING_STARTUP_S = 20


def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path, capsys) -> None:
    """In this process (``python -m serving.cli`` exits with what ``main`` returns: the start-up tests below run it)."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "/m", "name": "b"}, "engine": {"max_loras": "two"}}))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "engine.max_loras" in err and str(config) in err


def test_serve_refuses_missing_model_files(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "nowhere", "name": "b"}, "auth": {"mode": "open"}}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "model.path" in capsys.readouterr().err


def test_check_config_accepts_a_good_config(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m", "name": "b"}, "auth": {"mode": "open"}}))
    assert main(["check-config", "--config", str(config)]) == 0
    assert "ok" in capsys.readouterr().out


def test_keys_new_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, capsys) -> None:
    from serving.api.auth import KeyStore
    from serving.config import AuthSettings

    keys_file = tmp_path / "keys.yaml"
    assert main(["keys", "new", "--file", str(keys_file), "--id", "clinic", "--tenant", "hospital"]) == 0
    assert main(["keys", "new", "--file", str(keys_file), "--id", "ops", "--role", "admin"]) == 0
    first, second = capsys.readouterr().out.split()
    stored = keys_file.read_text()
    assert first not in stored and second not in stored
    store = KeyStore.from_settings(AuthSettings(mode="api_keys", keys_file=keys_file))
    assert (store.verify(first).id, store.verify(first).tenant) == ("clinic", "hospital")
    assert store.verify(second).role == "admin"
    # a repeated id is refused and leaves the file as it was
    assert main(["keys", "new", "--file", str(keys_file), "--id", "ops"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert keys_file.read_text() == stored


def _port_is_held(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _engine_processes(server: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(server.pid).children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(ENGINE_PROCESS_TITLE):
                found.append(process)
        except psutil.Error:
            continue
    return found


# When the signal comes: as soon as the port is held (imports, the store), or once vLLM's engine process runs.
SIGNAL_MOMENTS = ["port_held", "engine_starting"]


@pytest.mark.engine
@pytest.mark.parametrize("moment", SIGNAL_MOMENTS)
def test_serve_holds_its_port_and_stops_at_once_when_signalled_during_start_up(
    demo_assets, tmp_path: Path, moment: str
) -> None:
    """The engine picks free ports for its own sockets while it starts; were the server's port bound only
    after that (uvicorn's default), one of them could take it and the server would exit with EADDRINUSE.
    A SIGTERM during start-up (a pod deleted, a rollout undone) stops the server now, not after the engine's
    whole start, with exit status 0 and no engine process left behind."""
    config = demo_config(demo_assets)
    config["routing"] = None  # not under test: no prompt-router encoder to load before the engine starts
    port = config["server"]["port"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--config", str(tmp_path / "config.yaml")],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not _port_is_held(port) or (moment == "engine_starting" and not _engine_processes(server)):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"never reached {moment}"
            time.sleep(0.05)
        # Held, and not yet serving: the engine is still to start (or starting) behind it.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        assert "Application startup complete" not in log.read_text()
        children = psutil.Process(server.pid).children(recursive=True)
        server.terminate()
        assert server.wait(timeout=STOP_DURING_STARTUP_S) == 0, log.read_text()[-3000:]
        assert "Application startup complete" not in log.read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], alive
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
