"""``loraserve keys new --role metrics``: a scraper's key."""

from __future__ import annotations

from pathlib import Path

from serving.api.auth import KeyStore
from serving.cli import main
from serving.config import AuthSettings


def test_keys_new_makes_a_metrics_key(tmp_path: Path, capsys) -> None:
    keys_file = tmp_path / "keys.yaml"
    assert main(["keys", "new", "--file", str(keys_file), "--id", "scraper", "--role", "metrics"]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in keys_file.read_text()
    principal = KeyStore.from_settings(AuthSettings(mode="api_keys", keys_file=keys_file)).verify(key).principal()
    assert principal.role == "metrics"
    assert principal.may_call("/metrics") and not principal.may_call("/v1/completions")
