"""Rendered overlays, shared by the deploy tests (rendering takes well under a second each)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import RENDERED, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Overlay name ("base", "cpu", "gpu") -> its rendered objects."""
    return {name: render(path) for name, path in RENDERED.items()}
