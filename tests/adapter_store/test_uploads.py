"""Kept uploads shared by replicas: a directory every store mounts, or an S3 prefix on a real S3 API (moto).

Two stores with their own roots (their own disk caches) stand for two replicas; the second one reads
the first one's registry rows (a copy of its registry file: the rows are portable, ``upload:<sha256>``
whatever the backend), as a fleet's shared registry would serve them.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from pydantic import ValidationError

from adapter_store import AdapterStore, InvalidAdapter, SourceError, StoreSettings, content_digest
from adapter_store.registry import DB_NAME
from adapter_store.settings import S3UploadsSettings
from adapter_store.uploads import MARKER_SUFFIX, SWEEP_GRACE_S, LocalUploads, S3Uploads, UploadSource
from adapter_store.validation import BaseModelSpec
from tests.adapter_store.helpers import (
    BASE_NAME,
    BUCKET,
    lease,
    no_upload_lock,
    write_adapter,
    write_base_config,
    write_v1_registry,
)
from tests.adapter_store.test_store import old_digest
from tests.postgres import PASSWORD

PREFIX = "uploads/"


@pytest.fixture
def bucket(s3_server: str) -> str:
    client = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return s3_server


def s3_uploads(endpoint: str, prefix: str = PREFIX) -> dict:
    return {"type": "s3", "url_prefix": f"s3://{BUCKET}/{prefix}", "endpoint_url": endpoint}


def open_store(tmp_path: Path, root: str, uploads: dict | None, registry: str | None = None) -> AdapterStore:
    settings = StoreSettings.model_validate(
        {"root": tmp_path / root, "max_adapter_bytes": 1 << 20, "registry": registry}
        | ({} if uploads is None else {"uploads": uploads})
    )
    spec = BaseModelSpec.from_config(write_base_config(tmp_path / "base"), [BASE_NAME])
    return AdapterStore.open(settings, base=spec, max_lora_rank=16)


def upload(store: AdapterStore, files: Path, name: str):
    with store.staging() as staging:
        for file in files.iterdir():
            (staging / file.name).write_bytes(file.read_bytes())
        return store.register_upload(staging, name)


def share_registry(tmp_path: Path, source: str, target: str) -> None:
    """Give store ``target`` the registry rows of store ``source`` (what a shared registry does in a fleet)."""
    (tmp_path / target).mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(tmp_path / source / DB_NAME) as src, sqlite3.connect(tmp_path / target / DB_NAME) as dst:
        src.backup(dst)


def keys(endpoint: str, prefix: str = PREFIX) -> list[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def backend(endpoint: str, prefix: str = PREFIX) -> S3Uploads:
    return S3Uploads(S3UploadsSettings.model_validate(s3_uploads(endpoint, prefix)))


@pytest.mark.parametrize("kind", ["s3", "shared-directory"])
def test_an_upload_through_one_store_is_served_by_another(tmp_path: Path, bucket: str, kind: str) -> None:
    """Store A keeps the upload and goes away with its whole root; store B fetches it from the shared place."""
    prefix = f"{kind}-served/"
    uploads = s3_uploads(bucket, prefix) if kind == "s3" else {"type": "local", "path": str(tmp_path / "shared")}
    files = write_adapter(tmp_path / "src" / "up", seed=1)
    a = open_store(tmp_path, "a", uploads)
    version = upload(a, files, "up")
    assert version.source == f"upload:{version.version}"  # the same row whatever the backend
    a.close()
    share_registry(tmp_path, "a", "b")
    for path in (tmp_path / "a").iterdir():  # A's cache and staging: nothing of A's disk is left to read
        if path.is_dir():
            shutil.rmtree(path)
    b = open_store(tmp_path, "b", uploads)
    assert not b.is_cached(b.version("up"))
    with lease(b, "up") as adapter:
        assert content_digest(adapter.path) == version.version == content_digest(files)
    if kind == "s3":
        digest = version.version
        assert keys(bucket, prefix) == [
            f"{prefix}{digest}{MARKER_SUFFIX}",  # '.' sorts before '/'
            f"{prefix}{digest}/adapter_config.json",
            f"{prefix}{digest}/adapter_model.safetensors",
        ]
        assert not (tmp_path / "a" / "uploads").exists() and not (tmp_path / "b" / "uploads").exists()
    b.delete("up")  # the last version of these files: the shared copy goes too
    assert (keys(bucket, prefix) if kind == "s3" else list((tmp_path / "shared").iterdir())) == []
    b.close()


def test_a_half_written_upload_is_never_fetched(tmp_path: Path, bucket: str) -> None:
    """The upload fails on its last file: files are there, the marker is not, and no replica fetches them."""
    prefix = "half/"
    files = write_adapter(tmp_path / "src" / "half", seed=2)
    digest = content_digest(files)
    writer = backend(bucket, prefix)
    client = writer._s3.client

    def fail_on_the_weights(params: dict, **_: object) -> None:
        if params["Key"].endswith(".safetensors"):
            raise EndpointConnectionError(endpoint_url=bucket)

    client.meta.events.register("provide-client-params.s3.PutObject", fail_on_the_weights)
    with pytest.raises(SourceError, match=f"S3 request for s3://{BUCKET}/{prefix}{digest}/adapter_model.safetensors"):
        writer.keep(files, digest)
    assert keys(bucket, prefix) == [f"{prefix}{digest}/adapter_config.json"]  # half written
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SourceError) as info:
        UploadSource(backend(bucket, prefix), no_upload_lock).fetch(f"upload:{digest}", dest, max_bytes=1 << 20)
    assert f"upload:{digest} is not complete under s3://{BUCKET}/{prefix}" in info.value.message
    assert f"{prefix}{digest}{MARKER_SUFFIX} is missing" in info.value.message
    assert "upload the adapter again" in info.value.message and list(dest.iterdir()) == []


HOSTILE_KEYS = {
    "dot-dot": "../../outside/pwned.json",
    "absolute": "/{outside}/pwned.json",  # after "<digest>/": a double slash
    "dot": "./adapter_config.json",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_KEYS))
def test_hostile_object_keys_in_an_upload_are_refused(tmp_path: Path, bucket: str, kind: str) -> None:
    prefix = f"hostile-{kind}/"
    files = write_adapter(tmp_path / "src" / "h", seed=3)
    digest = content_digest(files)
    uploads = backend(bucket, prefix)
    uploads.keep(files, digest)
    name = HOSTILE_KEYS[kind].format(outside=tmp_path / "outside")
    boto3.client("s3", endpoint_url=bucket).put_object(Bucket=BUCKET, Key=f"{prefix}{digest}/{name}", Body=b"{}")
    dest = tmp_path / "staging" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(SourceError, match="has an unsafe name"):
        UploadSource(uploads, no_upload_lock).fetch(f"upload:{digest}", dest, max_bytes=1 << 20)
    assert list(dest.iterdir()) == [] and not (tmp_path / "outside").exists()


def test_the_byte_cap_holds_while_reading(tmp_path: Path, bucket: str) -> None:
    """An object replaced by a larger one between the listing and its download is cut off at the cap."""
    prefix = "capped/"
    files = write_adapter(tmp_path / "src" / "c", seed=4)
    digest = content_digest(files)
    uploads = backend(bucket, prefix)
    uploads.keep(files, digest)
    other = boto3.client("s3", endpoint_url=bucket)
    grown: list[bool] = []

    def grow(**_: object) -> None:
        if not grown:
            grown.append(True)
            other.put_object(Bucket=BUCKET, Key=f"{prefix}{digest}/adapter_config.json", Body=b" " * (3 << 20))

    uploads._s3.client.meta.events.register("before-call.s3.GetObject", grow)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidAdapter) as info:
        UploadSource(uploads, no_upload_lock).fetch(f"upload:{digest}", dest, max_bytes=1 << 20)
    assert info.value.reason == "too_large" and "more than the limit of 1048576 bytes" in info.value.message
    assert grown and list(dest.iterdir()) == []


def test_changed_files_on_s3_are_not_served(tmp_path: Path, bucket: str) -> None:
    """What an S3 upload holds is checked against the version's digest before the cache takes it."""
    prefix = "tampered/"
    a = open_store(tmp_path, "a", s3_uploads(bucket, prefix))
    version = upload(a, write_adapter(tmp_path / "src" / "t", seed=5), "t")
    a.close()
    other = write_adapter(tmp_path / "src" / "other", seed=6)  # valid files, other weights
    boto3.client("s3", endpoint_url=bucket).upload_file(
        str(other / "adapter_model.safetensors"), BUCKET, f"{prefix}{version.version}/adapter_model.safetensors"
    )
    share_registry(tmp_path, "a", "b")
    b = open_store(tmp_path, "b", s3_uploads(bucket, prefix))
    with pytest.raises(InvalidAdapter) as info, lease(b, "t"):
        pass
    assert info.value.reason == "checksum_mismatch"
    assert not b.is_cached(version)
    b.close()


def test_an_unreachable_bucket_is_named_with_the_fix(tmp_path: Path, bucket: str) -> None:
    store = open_store(tmp_path, "a", {**s3_uploads(bucket), "url_prefix": "s3://no-such-bucket/uploads/"})
    with pytest.raises(SourceError) as info:
        upload(store, write_adapter(tmp_path / "src" / "u", seed=7), "u")
    message = info.value.message
    assert "s3://no-such-bucket/uploads/" in message and "NoSuchBucket" in message
    assert "store.uploads" in message and "AWS_ACCESS_KEY_ID" in message
    assert isinstance(info.value.__cause__, Exception) and store.all_versions() == []
    store.close()


def test_a_legacy_upload_is_rekeyed_into_s3(tmp_path: Path, bucket: str) -> None:
    """A schema-1 upload under <root>/uploads/<old> moves to the S3 prefix under its new digest."""
    prefix = "legacy/"
    files = write_adapter(tmp_path / "src" / "old", seed=8)
    old, new = old_digest(files), content_digest(files)
    root = tmp_path / "a"
    shutil.copytree(files, root / "uploads" / old)
    write_v1_registry(root, [("old", old, f"upload:{old}", {})])
    a = open_store(tmp_path, "a", s3_uploads(bucket, prefix))
    version = a.version("old")
    assert (version.version, version.source, version.legacy_digest) == (new, f"upload:{new}", False)
    assert f"{prefix}{new}{MARKER_SUFFIX}" in keys(bucket, prefix)
    assert not (root / "uploads" / old).exists()
    a.close()
    share_registry(tmp_path, "a", "b")
    b = open_store(tmp_path, "b", s3_uploads(bucket, prefix))
    with lease(b, "old") as adapter:
        assert content_digest(adapter.path) == new
    b.close()


def test_a_legacy_upload_found_nowhere_stays_flagged_with_the_reason(tmp_path: Path, bucket: str, caplog) -> None:
    files = write_adapter(tmp_path / "src" / "gone", seed=9)
    old = old_digest(files)
    write_v1_registry(tmp_path / "a", [("gone", old, f"upload:{old}", {})])
    a = open_store(tmp_path, "a", s3_uploads(bucket, "gone/"))
    assert a.version("gone").legacy_digest
    assert f"upload:{old} is not complete under s3://{BUCKET}/gone/" in caplog.text
    a.close()


@pytest.mark.parametrize(
    ("uploads", "error"),
    [
        ({"type": "s3", "url_prefix": "s3://bucket/uploads"}, "ending in '/'"),
        ({"type": "s3", "url_prefix": "s3://bucket/a/../b/"}, "must look like"),
        ({"type": "s3", "url_prefix": "https://bucket/uploads/"}, "must look like"),
        ({"type": "ftp", "path": "/x"}, "does not match any of the expected tags"),
        ({"type": "local", "path": "/x", "url_prefix": "s3://b/"}, "Extra inputs are not permitted"),
    ],
)
def test_uploads_settings_are_strict(tmp_path: Path, uploads: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        StoreSettings.model_validate({"root": tmp_path, "uploads": uploads})


@pytest.mark.parametrize("uploads", [None, {"type": "local"}])
def test_uploads_default_to_the_store_root(tmp_path: Path, uploads: dict | None) -> None:
    store = open_store(tmp_path, "a", uploads)
    version = upload(store, write_adapter(tmp_path / "src" / "d", seed=10), "d")
    assert (tmp_path / "a" / "uploads" / version.version / "adapter_config.json").is_file()
    store.close()


def test_two_stores_keeping_the_same_upload_in_a_shared_directory_at_once(tmp_path: Path, monkeypatch) -> None:
    """B renames the same files into place while A is still copying: A's rename finds them there, and is done."""
    shared = tmp_path / "shared"
    a, b = LocalUploads(shared), LocalUploads(shared)
    files = write_adapter(tmp_path / "src" / "same", seed=11)
    digest = content_digest(files)
    copy = shutil.copytree
    b_kept: list[bool] = []

    def copy_while_b_keeps(src: Path, dst: Path) -> Path:
        copied = copy(src, dst)
        if not b_kept:
            b_kept.append(False)
            b_kept[0] = b.keep(files, digest)
        return copied

    monkeypatch.setattr(shutil, "copytree", copy_while_b_keeps)
    assert a.keep(files, digest) is False and b_kept == [True]
    assert [p.name for p in shared.iterdir()] == [digest]  # no partial copy is left behind
    assert content_digest(shared / digest) == digest


# -- replicas sharing one registry and one place for uploads: the races of keeping and discarding ---------------


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_registry(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A registry URL every store of the test opens: one SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared-registry' / 'registry.sqlite3'}"
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # as a deployment gives it: never in the URL
    return request.getfixturevalue("postgres_url").replace(f":{PASSWORD}@", "@")


def shared_uploads(kind: str, bucket: str, tmp_path: Path, prefix: str) -> dict:
    return s3_uploads(bucket, prefix) if kind == "s3" else {"type": "local", "path": str(tmp_path / "shared")}


@pytest.mark.parametrize("kind", ["s3", "shared-directory"])
def test_a_delete_racing_an_identical_upload_leaves_the_files_the_upload_counts_on(
    tmp_path: Path, bucket: str, shared_registry: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica B uploads the files of A's version as another adapter; A deletes its version after B found the
    files kept and before B's version commits. A saw no version naming the upload and discarded it: B keeps the
    files again once its version has committed, so a third replica with an empty disk can serve it."""
    uploads = shared_uploads(kind, bucket, tmp_path, f"{kind}-race/")
    files = write_adapter(tmp_path / "src" / "same", seed=11)
    a, b = (open_store(tmp_path, root, uploads, shared_registry) for root in ("a", "b"))
    first = upload(a, files, "first")
    register = b._registry.register

    def a_deletes_meanwhile(*args: object, **kwargs: object):
        a.delete(first.ref)
        return register(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(b._registry, "register", a_deletes_meanwhile)
        second = upload(b, files, "second")
    assert second.version == first.version and second.source == first.source and a.names() == ["second"]
    c = open_store(tmp_path, "c", uploads, shared_registry)
    with lease(c, "second") as adapter:
        assert content_digest(adapter.path) == second.version
    upload(c, files, "third")

    def listed() -> list:
        return keys(bucket, f"{kind}-race/") if kind == "s3" else list((tmp_path / "shared").iterdir())

    c.delete("second")  # "third" still names the upload: its files stay
    assert listed() != []
    c.delete("third")  # the last version naming it: its files go now
    assert listed() == []
    for store in (a, b, c):
        store.close()


def interrupt(kind: str, bucket: str, tmp_path: Path, prefix: str, files: Path) -> list[str]:
    """Files of an upload whose writer died before finishing; what a listing of the shared place shows."""
    digest = content_digest(files)
    if kind == "shared-directory":
        shutil.copytree(files, tmp_path / "shared" / f".partial-{digest}-0123abcd")
        return [f".partial-{digest}-0123abcd"]
    client = boto3.client("s3", endpoint_url=bucket)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}{digest}/adapter_config.json", Body=b"{}")
    return [f"{prefix}{digest}/adapter_config.json"]


def leftovers(kind: str, bucket: str, tmp_path: Path, prefix: str) -> list[str]:
    if kind == "s3":
        return keys(bucket, prefix)
    return sorted(p.name for p in (tmp_path / "shared").iterdir())


@pytest.mark.parametrize("kind", ["s3", "shared-directory"])
def test_an_interrupted_upload_is_swept_once_past_the_grace_period(
    tmp_path: Path, bucket: str, shared_registry: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{kind}-sweep/"
    uploads = shared_uploads(kind, bucket, tmp_path, prefix)
    a = open_store(tmp_path, "a", uploads, shared_registry)
    kept = upload(a, write_adapter(tmp_path / "src" / "kept", seed=12), "kept")
    complete = leftovers(kind, bucket, tmp_path, prefix)
    interrupted = interrupt(kind, bucket, tmp_path, prefix, write_adapter(tmp_path / "src" / "cut", seed=13))
    a.close()
    b = open_store(tmp_path, "b", uploads, shared_registry)  # within the grace period: it may still be written
    assert leftovers(kind, bucket, tmp_path, prefix) == sorted(complete + interrupted)
    b.close()
    later = time.time() + SWEEP_GRACE_S + 60
    monkeypatch.setattr("adapter_store.uploads.time.time", lambda: later)
    c = open_store(tmp_path, "c", uploads, shared_registry)
    assert leftovers(kind, bucket, tmp_path, prefix) == complete  # the complete upload stays, and is served
    with lease(c, "kept") as adapter:
        assert content_digest(adapter.path) == kept.version
    c.close()
