"""An adapter uploaded through one replica is served by another that never saw its files (``store.uploads`` on S3).

Replica A keeps the upload under an S3 prefix of a real S3 API (moto); then A is stopped and its whole
root (disk cache, staging) removed, and replica B starts with its own empty root. B reads A's registry
rows (a copy of its registry file: the rows name ``upload:<sha256>`` whatever the backend, so a fleet's
shared registry carries them as they are), fetches the files from S3 and answers token for token like A.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import boto3
import httpx
import pytest

from adapter_store.registry import DB_NAME
from tests.conftest import demo_config, start_server, stop_server
from tests.e2e.adapter_files import copy_adapter

pytestmark = pytest.mark.engine

BUCKET = "fleet-uploads"
PREFIX = "uploads/"
PROMPT = "Please explain how it works"


def greedy(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert "X-Adapter-Fallback" not in response.headers
    return response.json()["choices"][0]["text"]


def replica(demo_assets, workdir: Path, s3_server: str) -> dict:
    config = demo_config(demo_assets)
    config["store"] = {
        "root": str(workdir / "store"),
        "uploads": {"type": "s3", "url_prefix": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": s3_server},
        "max_adapter_bytes": 1 << 20,
    }
    return config


def test_an_upload_through_one_replica_is_served_by_another(demo_assets, s3_server, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=BUCKET)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    # Rescaled: its own digest and outputs, so no configured adapter B registers at start-up has these files.
    files = copy_adapter(demo_assets.adapters["legal"], tmp_path / "upload", scale=1.5)

    a = start_server(replica(demo_assets, a_dir, s3_server), a_dir)
    try:
        upload = [("files", (p.name, p.read_bytes())) for p in sorted(files.iterdir())]
        response = httpx.post(f"{a.url}/v1/adapters/shared/versions", files=upload, timeout=300)
        assert response.status_code == 201, response.text
        digest = response.json()["info"]["version"]
        assert response.json()["source"] == f"upload:{digest}"
        on_a = greedy(a.url, "shared")
        assert on_a != greedy(a.url, a.base_model)  # the adapter's own answer
    finally:
        stop_server(a)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    assert listed == {f"{PREFIX}{digest}.complete"} | {f"{PREFIX}{digest}/{p.name}" for p in files.iterdir()}

    (b_dir / "store").mkdir(parents=True)
    with sqlite3.connect(a_dir / "store" / DB_NAME) as rows, sqlite3.connect(b_dir / "store" / DB_NAME) as copy:
        rows.backup(copy)
    shutil.rmtree(a_dir / "store")  # nothing of A's disk is left: B can only fetch from S3
    b = start_server(replica(demo_assets, b_dir, s3_server), b_dir)
    try:
        assert not (b_dir / "store" / "cache" / digest).exists()
        assert greedy(b.url, "shared") == on_a
        assert (b_dir / "store" / "cache" / digest).is_dir() and not (b_dir / "store" / "uploads").exists()
        deleted = httpx.delete(f"{b.url}/v1/adapters/shared", timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", []) == []
    finally:
        stop_server(b)
