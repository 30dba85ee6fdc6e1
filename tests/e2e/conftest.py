"""Servers with API keys shared by the e2e modules whose configs agree.

Starting a server costs this machine a minute of engine start-up, so modules
that can run on the same config share a session server: ``secure`` serves
test_security.py, test_security_metrics.py and, after every other test,
test_fuzz.py; ``limited`` serves test_security_limits.py,
test_security_tenants.py and test_security_files.py.
Each module has keys of its own (ids ``<module>.<name>``, see ``keys_of``), so
one module's rate buckets, concurrency slots and denials never touch another's.
``SHARED_SERVERS`` in tests/conftest.py lists them, so that ``make test`` runs a
server's modules on one worker and starts it once.

The two cannot be one: ``secure`` answers for a broken adapter with a named
fallback (test_security.py checks it), ``limited`` must answer 503 (the tenant
tests check that the error tells nothing), and their limits differ (per-key
concurrency 2 against requests of 4 sequences). test_fuzz.py changes routes
and adapters at random, which no other module may see: it is one of
``SERVER_ENDERS`` (tests/conftest.py), so it runs after the rest of
``secure``'s tests; it keeps its generated requests short itself (its
``FUZZ_MAX_TOKENS``), since ``secure``'s held streams need max_tokens 1000. The
configured adapters are pinned, so the fuzzing's random deletes leave them.

``admin`` serves test_adapter_admin.py and test_adapter_loaded_metric.py: a
local source volume, the ``base`` fallback, upload limits, one LoRA slot and
two adapters in host memory (which the loaded-adapter gauge's tests need to
push adapters through the tiers; the admin tests pass on any slot count).
Both register adapters under fresh names only, so neither sees the other's.

``project_engine`` is no server: one run of ``project_engine.py`` (the
server's engine wrapper and store in a script, no HTTP) whose results
test_mixed_batch.py and test_engine_refusal.py both check, so their one
engine configuration starts once, and the stock-ops engine in the same
interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkpoints.assets import DemoAssets
from serving.api.auth import hash_key, new_key
from tests.conftest import REPO, RunningServer, demo_config, retire_server, start_server, use_api_keys
from tests.e2e.adapter_files import CONFIG, copy_adapter

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
    "fuzz.user": {"role": "user"},
    "fuzz.admin": {"role": "admin"},
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
    """The shared servers' keys of ``module`` ("security", "metrics", "fuzz", "limits", "tenants"): name -> key."""
    prefix = f"{module}."
    return {key_id.removeprefix(prefix): key for key_id, key in _SECRETS.items() if key_id.startswith(prefix)}


def _key_entries(keys: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": key_id, "sha256": hash_key(_SECRETS[key_id])} | entry for key_id, entry in keys.items()]


@pytest.fixture(scope="session")
def secure(demo_assets, tmp_path_factory) -> Iterator[RunningServer]:
    """API keys, tenant-owned `legal` and `medical`, tight limits, 4 engine slots and no queue; adapters
    registered at run time come from a local volume, one that cannot be served answers as `code`, and the
    configured ones are pinned."""
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
        "pinned": [adapter["name"] for adapter in config["adapters"]],
    }
    running = start_server(config, workdir)
    yield running
    retire_server(running)


@pytest.fixture(scope="session")
def limited(demo_assets, s3_server: str, tmp_path_factory) -> Iterator[RunningServer]:
    """API keys, limits that count work (sequences, prompts, stop strings, uploads), 6 engine slots and no
    queue; names found in a local volume are registered on first use, and a broken adapter is an error.
    Adapters also come from an S3 prefix (moto)."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    workdir = tmp_path_factory.mktemp("limited")
    config = demo_config(demo_assets, max_num_seqs=LIMITED_SLOTS)
    config["routing"] = None  # none of its modules routes: no prompt-router encoder to load
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
    retire_server(running)


def run_project_engine(config: dict, workdir: Path, refusal: tuple[Path, Path]) -> dict:
    """Run ``project_engine.py`` on ``config`` (``refusal``: the refused and gated adapters) and return its result."""
    config_path = workdir / "project.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}  # the script sets each engine's own
    command = [sys.executable, "-m", "tests.e2e.project_engine", str(config_path), *map(str, refusal)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stderr[-5000:]
    return json.loads(result[-1].removeprefix("RESULT "))


def slot_pressure_config(demo_assets) -> dict:
    """Two LoRA slots for three adapters plus the base, so every mixed batch has both slots taken."""
    config = demo_config(demo_assets, max_loras=2, max_cpu_loras=4)
    # float32: bf16 base matmuls round differently at different batch sizes, which can
    # move a late greedy token for reasons unrelated to LoRA; in float32 any difference is a bug.
    config["model"]["dtype"] = "float32"
    return config


@pytest.fixture(scope="session")
def project_engine(demo_assets, tmp_path_factory) -> dict:
    """One run of ``project_engine.py``: with our plugins, ``mixed`` (test_mixed_batch.py) and, last, ``refusal``
    (test_engine_refusal.py) on a copy of the demo ``code`` adapter whose config vLLM's loader refuses, and on a
    copy of ``legal`` whose config is a named pipe the check writes once the engine served a request meanwhile;
    then ``stock``, ``mixed`` with vLLM's stock LoRA ops (test_mixed_batch.py)."""
    workdir = tmp_path_factory.mktemp("project-engine")
    refused = copy_adapter(demo_assets.adapters["code"], workdir / "refused")
    adapter_config = json.loads((refused / CONFIG).read_text())
    (refused / CONFIG).write_text(
        json.dumps(adapter_config | {"bias": "all"})
    )  # vLLM: "Adapter bias is not supported."
    gated = copy_adapter(demo_assets.adapters["legal"], workdir / "gated")
    (gated / CONFIG).unlink()
    os.mkfifo(gated / CONFIG)
    return run_project_engine(slot_pressure_config(demo_assets), workdir, (refused, gated))


ADMIN_UPLOAD_LIMIT = 400_000  # bytes; a demo adapter is ~170 kB, so two fit in one body but not three


@dataclass
class AdminServer:
    """The ``admin`` server (replaced by test_adapter_admin.py's restart test) and its directories."""

    server: RunningServer
    workdir: Path
    volume: Path  # the configured local source root
    outside: Path  # a directory no source may read
    demo: DemoAssets

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def admin(demo_assets, tmp_path_factory) -> Iterator[AdminServer]:
    workdir = tmp_path_factory.mktemp("adapter-admin")
    volume, outside = workdir / "volume", workdir / "outside"
    volume.mkdir()
    outside.mkdir()
    # One slot and two adapters in host memory: three adapters in a row push the first from its slot, then
    # out of host memory (test_adapter_loaded_metric.py).
    config = demo_config(demo_assets, max_loras=1, max_cpu_loras=2)
    config["routing"] = None  # not under test: no prompt-router encoder to load at each start
    config["store"] = {
        "root": str(workdir / "store"),
        "sources": [{"type": "local", "roots": [str(volume)]}],
        "fallback": "base",
        "max_adapter_bytes": 1 << 20,
    }
    config["limits"] = {"max_upload_bytes": ADMIN_UPLOAD_LIMIT}
    state = AdminServer(start_server(config, workdir), workdir, volume, outside, demo_assets)
    yield state
    retire_server(state.server)
