"""The copy primitives every source uses: name confinement and the running byte cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store import InvalidAdapter, SourceError
from adapter_store.safe_copy import ByteBudget, copy_capped, safe_parts


def test_copy_capped_stops_reading_at_the_limit(tmp_path: Path) -> None:
    """A body that never ends (or lies about its length) is read at most one chunk past the cap."""
    served = []

    def endless(n: int) -> bytes:
        served.append(n)
        return b"x" * n

    budget = ByteBudget("s3://b/endless/", max_bytes=3 << 20)
    with pytest.raises(InvalidAdapter, match="more than the limit of 3145728 bytes"):
        copy_capped(endless, tmp_path / "out", budget)
    assert sum(served) <= (3 << 20) + (1 << 20)
    assert (tmp_path / "out").stat().st_size <= 3 << 20


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a//b", "a/./b", "../x", "a/..", "a/b/c/d", "x" * 300, "a\0b"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(SourceError, match="unsafe name"):
        safe_parts(name, "s3://b/p/")
