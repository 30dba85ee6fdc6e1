"""``python -m loadtests.bench_registry`` at a tiny size on both registry backends: every figure is written and
counts what it says (no timing thresholds: speed lives in the benchmark's own output)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from loadtests import bench_registry
from loadtests.bench_registry import main, without_password

ADAPTERS, VERSIONS, LOOKUPS = 4, 3, 20


def test_the_registry_bench_writes_every_figure(tmp_path: Path, postgres_url: str, monkeypatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "restored-after-the-test")  # the bench moves the URL's password here
    # The change feed of 12 registrations is quiet within a poll of its listener (0.02 s here): 0.1 s of quiet, not
    # the bench's 0.5 s, once per backend (the test took 1.5 s, 1 s of it these waits).
    monkeypatch.setattr(bench_registry, "settle", functools.partial(bench_registry.settle, quiet_s=0.1))
    out = tmp_path / "bench_registry.json"
    main(["--adapters", str(ADAPTERS), "--versions", str(VERSIONS), "--lookups", str(LOOKUPS), "--repeats", "2",
          "--postgres-url", postgres_url, "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"]["model"] and "loadavg_before" in report["machine"]
    assert set(report["backends"]) == {"sqlite", "postgresql"}
    for backend in report["backends"].values():
        assert backend["versions"] == ADAPTERS * VERSIONS
        for path in ("registry", "catalog"):
            for kind in ("name", "name@version", "name@alias"):
                figures = backend["resolve"][path][kind]
                assert figures["n"] == LOOKUPS and 0 < figures["p50_us"] <= figures["p99_us"], (path, kind)
        models = backend["models"]
        # the base model, then adapters a0..a3: even ones public, odd ones owned by tenant-1 and tenant-3
        assert (models["admin"]["models"], models["tenant"]["models"]) == (1 + ADAPTERS, 1 + ADAPTERS // 2)
        assert models["admin"]["body_bytes"] > models["tenant"]["body_bytes"]
        for row in ("from_memory", "after_a_change"):
            assert models["admin"][row]["n"] == 2
        assert models["previous_admin"]["n"] == 1
        pages = backend["adapters_page_limit_100"]
        # the real page: every adapter from the start, the second half after the middle name (a0..a3: after a2)
        assert (pages["first"]["adapters"], pages["middle"]["adapters"]) == (ADAPTERS, ADAPTERS - ADAPTERS // 2 - 1)
        assert pages["first"]["body_bytes"] > pages["middle"]["body_bytes"]
        for row in ("from_memory", "after_a_change"):
            assert pages["first"][row]["n"] == 2


@pytest.mark.parametrize("url", ["postgresql://u:secret@db:5432/x", "postgresql://u@db:5432/x"])
def test_a_password_in_the_url_moves_to_pgpassword(url: str, monkeypatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    assert without_password(url) == "postgresql://u@db:5432/x"
    assert os.environ.get("PGPASSWORD") == ("secret" if "secret" in url else None)
