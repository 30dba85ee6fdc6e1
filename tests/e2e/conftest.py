"""Servers with API keys shared by the e2e modules whose configs agree.

Starting a server costs this machine a minute of engine start-up, so modules
that can run on the same config share a session server: ``secure`` serves
test_security.py and test_security_metrics.py; ``limited`` serves
test_security_limits.py, test_security_tenants.py and test_security_files.py.
Each module has keys of its own (ids ``<module>.<name>``, see ``keys_of``), so
one module's rate buckets, concurrency slots and denials never touch another's.
``SHARED_SERVERS`` in tests/conftest.py lists them, so that ``make test`` runs a
server's modules on one worker and starts it once.

The two cannot be one: ``secure`` answers for a broken adapter with a named
fallback (test_security.py checks it), ``limited`` must answer 503 (the tenant
tests check that the error tells nothing), and their limits differ (per-key
concurrency 2 against requests of 4 sequences). test_fuzz.py keeps a server of
its own: max_tokens 8 keeps its thousands of generated requests short, and it
changes routes and adapters at random, which no other module may see."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serving.api.auth import hash_key, new_key
from tests.conftest import RunningServer, demo_config, start_server, stop_server, use_api_keys

ENGINE_SLOTS = 4  # engine.max_num_seqs; with no queue, the 5th concurrent sequence gets 503
RATE_BURST = 3
STRICT_RATE = {"per_minute": 60, "burst": RATE_BURST}  # for keys that must hit their rate limit
PER_KEY_CONCURRENCY = 2
MAX_BODY = 64 * 1024
SECURE_LIMITS: dict[str, Any] = {
    "max_body_bytes": MAX_BODY,
    "max_prompt_tokens": 200,
    "max_tokens": 1000,
    "max_n": 2,
    "max_concurrent_per_key": PER_KEY_CONCURRENCY,
    "rate": {"per_minute": 6000, "burst": 1000},
    "max_queued_requests": 0,
}
# The demo adapters' owners: `code` is public.
OWNERS = {"legal": "lawfirm", "medical": "hospital"}
# key id -> its entry in the keys file (besides the hash)
SECURE_KEYS: dict[str, dict[str, Any]] = {
    "security.hospital": {"role": "user", "tenant": "hospital"},
    "security.lawfirm": {"role": "user", "tenant": "lawfirm"},
    "security.admin": {"role": "admin"},
    "security.public": {"role": "user"},
    "security.burst": {"role": "user", "rate": STRICT_RATE},
    "security.counted": {"role": "user", "rate": STRICT_RATE},
    "security.busy1": {"role": "user"},
    "security.busy2": {"role": "user"},
    "security.busy3": {"role": "user"},
    "metrics.user": {"role": "user"},
    "metrics.metrics": {"role": "metrics"},
    "metrics.admin": {"role": "admin"},
}

BUCKET, PREFIX = "hostile", "adapters/"  # the S3 source of `limited`
LIMITED_SLOTS = 6  # engine.max_num_seqs of `limited`; no queue: at most 6 sequences admitted at once
SMALL_RATE = {"per_minute": 6, "burst": 4}
UPLOAD_BURST = 12  # every upload attempt takes a token, refused or not
LIMITED_LIMITS: dict[str, Any] = {
    "max_prompts_per_request": 3,
    "max_stop": 4,
    "max_stop_chars": 32,
    "max_n": 3,
    "max_tokens": 1000,
    "max_queued_requests": 0,
    "rate": {"per_minute": 6000, "burst": 1000},
    "upload_rate": {"per_minute": 1, "burst": UPLOAD_BURST},
}
LIMITED_KEYS: dict[str, dict[str, Any]] = {
    "limits.admin": {"role": "admin"},
    "limits.uploader": {"role": "admin"},
    "limits.cost": {"role": "user", "rate": SMALL_RATE},
    "limits.single": {"role": "user", "rate": SMALL_RATE},
    "limits.user": {"role": "user"},
    "limits.params": {"role": "user"},
    "limits.holder": {"role": "user"},
    "limits.other": {"role": "user"},
    "tenants.alpha": {"role": "user", "tenant": "alpha"},
    "tenants.beta": {"role": "user", "tenant": "beta"},
    "tenants.plain": {"role": "user"},
    "tenants.admin": {"role": "admin"},
    "files.admin": {"role": "admin"},
}
_SECRETS = {key_id: new_key() for key_id in SECURE_KEYS | LIMITED_KEYS}


def keys_of(module: str) -> dict[str, str]:
    """The shared servers' keys of ``module`` ("security", "metrics", "limits", "tenants"): name -> key."""
    prefix = f"{module}."
    return {key_id.removeprefix(prefix): key for key_id, key in _SECRETS.items() if key_id.startswith(prefix)}


def _key_entries(keys: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": key_id, "sha256": hash_key(_SECRETS[key_id])} | entry for key_id, entry in keys.items()]


@pytest.fixture(scope="session")
def secure(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    """API keys, tenant-owned `legal` and `medical`, tight limits, 4 engine slots and no queue; adapters
    registered at run time come from a local volume, and one that cannot be served answers as `code`."""
    workdir = tmp_path_factory.mktemp("secure")
    config = demo_config(demo_assets, max_num_seqs=ENGINE_SLOTS)
    use_api_keys(config, workdir, _key_entries(SECURE_KEYS))
    for adapter in config["adapters"]:
        if adapter["name"] in OWNERS:
            adapter["tenant"] = OWNERS[adapter["name"]]
    assert config["routing"]["admin_enabled"]  # run-time route changes
    config["limits"] = SECURE_LIMITS
    (workdir / "volume").mkdir()
    config["store"] = {
        "root": str(workdir / "store"),
        "sources": [{"type": "local", "roots": [str(workdir / "volume")]}],
        "fallback": "code",
    }
    running = start_server(config, workdir)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def limited(demo_assets, s3_server: str, tmp_path_factory) -> Iterator[RunningServer]:
    """API keys, limits that count work (sequences, prompts, stop strings, uploads), 6 engine slots and no
    queue; names found in a local volume are registered on first use, and a broken adapter is an error.
    Adapters also come from an S3 prefix (moto)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    workdir = tmp_path_factory.mktemp("limited")
    config = demo_config(demo_assets, max_num_seqs=LIMITED_SLOTS)
    use_api_keys(config, workdir, _key_entries(LIMITED_KEYS))
    config["limits"] = LIMITED_LIMITS
    (workdir / "volume").mkdir()
    config["store"] = {
        "root": str(workdir / "store"),
        "sources": [
            {"type": "local", "roots": [str(workdir / "volume")]},
            {"type": "s3", "url_prefixes": [f"s3://{BUCKET}/{PREFIX}"], "endpoint_url": s3_server},
        ],
        "on_demand": True,
        "fallback": "error",
    }
    running = start_server(config, workdir)
    yield running
    stop_server(running)
