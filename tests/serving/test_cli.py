"""The ``loraserve`` command line: a bad config stops start-up with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from serving.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_serve_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "/m", "name": "b"}, "engine": {"max_loras": "two"}}))
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2
    assert "engine.max_loras" in done.stderr and str(config) in done.stderr


def test_serve_refuses_missing_model_files(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "nowhere", "name": "b"}}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "model.path" in capsys.readouterr().err


def test_check_config_accepts_a_good_config(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m", "name": "b"}}))
    assert main(["check-config", "--config", str(config)]) == 0
    assert "ok" in capsys.readouterr().out
