"""Sources: local roots (confinement) and S3 against a real S3-compatible server (moto)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from adapter_store import InvalidAdapter, SourceError, content_digest
from adapter_store.safe_copy import MAX_FILES
from adapter_store.settings import LocalSourceSettings, S3SourceSettings
from adapter_store.sources import LocalSource, S3Source, SourceSet
from adapter_store.uploads import LocalUploads, UploadSource
from tests.adapter_store.helpers import BUCKET, no_upload_lock, upload, write_adapter


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "vol-a", tmp_path / "vol-b"
    write_adapter(a / "code", seed=1)
    write_adapter(b / "legal", seed=2)
    outside = write_adapter(tmp_path / "outside" / "evil", seed=3)
    (a / "escape-dir").symlink_to(outside, target_is_directory=True)
    inner = write_adapter(a / "sneaky", seed=4)
    (inner / "notes.md").symlink_to(tmp_path / "outside" / "evil" / "adapter_config.json")
    (a / "alias-dir").symlink_to(a / "code", target_is_directory=True)
    return a, b


@pytest.fixture
def local(roots: tuple[Path, Path]) -> LocalSource:
    return LocalSource(LocalSourceSettings(type="local", roots=list(roots)))


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("{a}/../outside/evil", "contains '..'"),
        ("file://{a}/code/../../outside/evil", "contains '..'"),
        ("{tmp}/outside/evil", "outside the configured local roots"),
        ("{a}/escape-dir", "outside the configured local roots"),
        ("{a}/sneaky", "(notes.md)"),
        ("code", "is relative"),
        ("{a}/missing", "is not a directory"),
    ],
)
def test_local_refusals(tmp_path: Path, roots, local: LocalSource, uri: str, fragment: str) -> None:
    uri = uri.format(a=roots[0], tmp=tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SourceError) as info:
        local.fetch(uri, dest, max_bytes=1 << 20)
    assert fragment in info.value.message
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("form", ["{a}/code", "file://{a}/code", "{a}/alias-dir"])
def test_local_fetch_copies_the_files(tmp_path: Path, roots, local: LocalSource, form: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    local.fetch(form.format(a=roots[0]), dest, max_bytes=1 << 20)
    assert content_digest(dest) == content_digest(roots[0] / "code")


def test_local_size_limit(tmp_path: Path, roots, local: LocalSource) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="more than the limit of 100 bytes"):
        local.fetch(str(roots[0] / "code"), dest, max_bytes=100)


def test_local_find(roots, local: LocalSource) -> None:
    assert local.find("legal") == (roots[1] / "legal").as_uri()
    assert local.find("code") == (roots[0] / "code").as_uri()
    assert local.find("escape-dir") is None  # exists, but resolves outside the roots
    assert local.find("nope") is None


@pytest.fixture
def s3(s3_server: str, tmp_path: Path) -> tuple[S3Source, Path]:
    adapter = write_adapter(tmp_path / "src" / "code", seed=5)
    upload(s3_server, adapter, "team/code/")
    upload(s3_server, adapter, "private/code/")
    settings = S3SourceSettings(type="s3", url_prefixes=[f"s3://{BUCKET}/team/"], endpoint_url=s3_server)
    return S3Source(settings), adapter


def test_s3_fetch_and_find(tmp_path: Path, s3) -> None:
    source, adapter = s3
    dest = tmp_path / "dest"
    dest.mkdir()
    source.fetch(f"s3://{BUCKET}/team/code/", dest, max_bytes=1 << 20)
    assert content_digest(dest) == content_digest(adapter)
    assert source.find("code") == f"s3://{BUCKET}/team/code/"
    assert source.find("legal") is None


@pytest.mark.parametrize(
    ("uri", "error", "fragment"),
    [
        (f"s3://{BUCKET}/private/code/", SourceError, "outside the configured S3 prefixes"),
        (f"s3://{BUCKET}/team/../private/code/", SourceError, "outside the configured S3 prefixes"),
        (f"s3://{BUCKET}/team/missing/", SourceError, "no objects under"),
        (f"s3://{BUCKET}/team/code/", InvalidAdapter, "more than the limit of 100 bytes"),
    ],
)
def test_s3_refusals(tmp_path: Path, s3, uri: str, error: type, fragment: str) -> None:
    source, _ = s3
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(error) as info:
        source.fetch(uri, dest, max_bytes=100 if error is InvalidAdapter else 1 << 20)
    assert fragment in info.value.message
    assert list(dest.iterdir()) == []


def test_s3_request_failure_is_a_source_error(tmp_path: Path, s3_server: str) -> None:
    settings = S3SourceSettings(type="s3", url_prefixes=["s3://no-such-bucket/"], endpoint_url=s3_server)
    with pytest.raises(SourceError, match="S3 request for s3://no-such-bucket/code/ failed.*NoSuchBucket"):
        S3Source(settings).fetch("s3://no-such-bucket/code/", tmp_path, max_bytes=1 << 20)


def test_source_set_routes_by_scheme(tmp_path: Path, roots, s3_server: str, s3) -> None:
    sources = SourceSet(
        [
            LocalSourceSettings(type="local", roots=list(roots)),
            S3SourceSettings(type="s3", url_prefixes=[f"s3://{BUCKET}/team/"], endpoint_url=s3_server),
        ]
    )
    assert isinstance(sources.for_uri(str(roots[0] / "code")), LocalSource)
    assert isinstance(sources.for_uri(f"s3://{BUCKET}/team/code/"), S3Source)
    assert sources.find("code") == (roots[0] / "code").as_uri()  # config order: local first
    with pytest.raises(SourceError, match="no source is configured for 'https://x/y' \\(scheme 'https'\\)"):
        sources.for_uri("https://x/y")
    assert (
        SourceSet([S3SourceSettings(type="s3", url_prefixes=[f"s3://{BUCKET}/team/"], endpoint_url=s3_server)]).find(
            "code"
        )
        == f"s3://{BUCKET}/team/code/"
    )


# -- hostile files: names, sizes, links, FIFOs, devices ----------------------------------------------


def _s3_source(s3_server: str, prefix: str) -> S3Source:
    return S3Source(S3SourceSettings(type="s3", url_prefixes=[f"s3://{BUCKET}/{prefix}"], endpoint_url=s3_server))


@pytest.mark.parametrize("shape", ["double-slash", "dot-dot"])
def test_s3_keys_cannot_write_outside_the_destination(tmp_path: Path, s3_server: str, shape: str) -> None:
    import boto3

    adapter = write_adapter(tmp_path / "src" / "x", seed=6)
    prefix = f"traversal-{shape}/"
    upload(s3_server, adapter, f"{prefix}x/")
    victim = tmp_path / "outside" / "pwned.json"
    # "x//<abs path>": the part after the prefix is absolute; "x/../../..": it climbs out of dest.
    rel = str(victim) if shape == "double-slash" else "../../outside/pwned.json"
    key = f"{prefix}x/{rel}"
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=BUCKET, Key=key, Body=b"{}")
    dest = tmp_path / "staging" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(SourceError, match="has an unsafe name"):
        _s3_source(s3_server, prefix).fetch(f"s3://{BUCKET}/{prefix}x/", dest, max_bytes=1 << 20)
    assert not victim.exists() and not (tmp_path / "outside").exists()
    assert list(dest.iterdir()) == []


def test_s3_cap_holds_when_an_object_grows_after_listing(tmp_path: Path, s3_server: str) -> None:
    """The listed size cannot be trusted: the object is replaced by a larger one between list and download."""
    import boto3

    adapter = write_adapter(tmp_path / "src" / "grow", seed=7)
    upload(s3_server, adapter, "growing/grow/")
    source = _s3_source(s3_server, "growing/")
    other = boto3.client("s3", endpoint_url=s3_server)
    swapped = []

    def grow(**_: object) -> None:
        if not swapped:
            swapped.append(True)
            other.put_object(Bucket=BUCKET, Key="growing/grow/adapter_config.json", Body=b" " * (3 << 20))

    source.client.meta.events.register("before-call.s3.GetObject", grow)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidAdapter) as info:
        source.fetch(f"s3://{BUCKET}/growing/grow/", dest, max_bytes=1 << 20)
    assert info.value.reason == "too_large" and "more than the limit of 1048576 bytes" in info.value.message
    assert swapped and list(dest.iterdir()) == []


def test_s3_too_many_objects(tmp_path: Path, s3_server: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    upload(s3_server, write_adapter(tmp_path / "src" / "many", seed=8), "many/many/")
    for i in range(MAX_FILES):
        client.put_object(Bucket=BUCKET, Key=f"many/many/notes-{i}.txt", Body=b"x")
    with pytest.raises(InvalidAdapter) as info:
        _s3_source(s3_server, "many/").fetch(f"s3://{BUCKET}/many/many/", tmp_path, max_bytes=1 << 20)
    assert info.value.reason == "too_many_files"


def _local_with(tmp_path: Path, make) -> tuple[LocalSource, Path]:
    root = tmp_path / "root"
    adapter = write_adapter(root / "adapter", seed=9)
    make(adapter, tmp_path)
    return LocalSource(LocalSourceSettings(type="local", roots=[root])), adapter


def _hard_link_to_a_secret(adapter: Path, tmp: Path) -> None:
    secret = tmp / "secrets" / "token.txt"
    secret.parent.mkdir()
    secret.write_text("s3cr3t")
    os.link(secret, adapter / "README.md")


def _socket(adapter: Path, tmp: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(adapter / "notes.txt"))
    sock.close()


LOCAL_HOSTILE = {
    "hard-link": (_hard_link_to_a_secret, "has 2 hard links"),
    "symlink-inside-the-root": (
        lambda a, tmp: (a / "notes.md").symlink_to(a / "adapter_config.json"),
        "cannot be read as a plain file or directory",
    ),
    "fifo": (lambda a, tmp: os.mkfifo(a / "notes.txt"), "not a regular file"),
    "socket": (_socket, "cannot be read as a plain file or directory"),
    "too-deep": (lambda a, tmp: write_adapter(a / "b" / "c" / "d"), "more than 3 levels"),
}


@pytest.mark.parametrize("kind", sorted(LOCAL_HOSTILE))
def test_local_refuses_links_fifos_and_sockets_without_hanging(tmp_path: Path, kind: str) -> None:
    make, fragment = LOCAL_HOSTILE[kind]
    local, adapter = _local_with(tmp_path, make)
    dest = tmp_path / "dest"
    dest.mkdir()
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            local.fetch(str(adapter), dest, max_bytes=1 << 20)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # a FIFO opened for reading blocks until a writer comes: unblock it, then fail
        with open(adapter / "notes.txt", "wb"):
            pass
        pytest.fail("fetch hung on a FIFO")
    assert isinstance(outcome[0], SourceError), outcome
    assert fragment in outcome[0].message
    assert list(dest.iterdir()) == []


def test_local_device_file_is_refused(tmp_path: Path) -> None:
    """Needs CAP_MKNOD, which the project's machines and CI have (they run as root)."""

    def make(adapter: Path, tmp: Path) -> None:
        os.mknod(adapter / "notes.txt", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero: endless bytes

    local, adapter = _local_with(tmp_path, make)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SourceError, match="not a regular file"):
        local.fetch(str(adapter), dest, max_bytes=1 << 20)


def test_local_too_many_files(tmp_path: Path) -> None:
    local, adapter = _local_with(tmp_path, lambda a, tmp: [(a / f"n{i}.txt").write_text("x") for i in range(64)])
    with pytest.raises(InvalidAdapter) as info:
        local.fetch(str(adapter), tmp_path, max_bytes=1 << 20)
    assert info.value.reason == "too_many_files"


def test_upload_source_copies_within_the_cap(tmp_path: Path) -> None:
    uploads = UploadSource(LocalUploads(tmp_path / "uploads"), no_upload_lock)
    adapter = write_adapter(tmp_path / "a", seed=10)
    uri, _ = uploads.keep(adapter, content_digest(adapter))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidAdapter, match="more than the limit of 1000 bytes"):
        uploads.fetch(uri, dest, max_bytes=1000)
    assert list(dest.iterdir()) == []
    uploads.fetch(uri, dest, max_bytes=1 << 20)
    assert content_digest(dest) == content_digest(adapter)
