"""The soak script's bookkeeping: memory of a process tree, outcomes by kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from loadtests.soak import outcomes, tree_rss_bytes


def test_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (64 << 20); time.sleep(30)"])
    try:
        alone = tree_rss_bytes(child.pid)
        for _ in range(100):  # wait until the child holds its 64 MiB
            alone = tree_rss_bytes(child.pid)
            if alone > 64 << 20:
                break
            subprocess.run(["sleep", "0.05"])
        assert alone > 64 << 20
        assert tree_rss_bytes(os.getpid()) >= alone  # the parent's tree includes the child
    finally:
        child.kill()
        child.wait()


def test_outcomes_by_kind_and_status(tmp_path):
    records = [
        {"kind": "targeted", "status": 200},
        {"kind": "targeted", "status": 200},
        {"kind": "auto", "status": 200},
        {"kind": "bad", "status": 404, "bad_case": "unknown_model", "expected_status": 404},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    assert outcomes(path) == {
        "auto 200": 1,
        "bad 404 (unknown_model, expected 404)": 1,
        "targeted 200": 2,
    }
