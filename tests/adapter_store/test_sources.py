"""Sources: local roots (confinement) and S3 against a real S3-compatible server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store import InvalidAdapter, SourceError, content_digest
from adapter_store.settings import LocalSourceSettings, S3SourceSettings
from adapter_store.sources import LocalSource, S3Source, SourceSet
from tests.adapter_store.helpers import BUCKET, upload, write_adapter


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
    assert SourceSet([S3SourceSettings(type="s3", url_prefixes=[f"s3://{BUCKET}/team/"],
                                       endpoint_url=s3_server)]).find("code") == f"s3://{BUCKET}/team/code/"
