"""The store's settings: strict, with messages that name the key and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from adapter_store.settings import LocalSourceSettings, S3SourceSettings, StoreSettings


def test_full_settings_parse() -> None:
    settings = StoreSettings.model_validate(
        {
            "root": "/var/lib/loraserve",
            "sources": [
                {"type": "local", "roots": ["/mnt/adapters"]},
                {"type": "s3", "url_prefixes": ["s3://bucket/adapters/"], "endpoint_url": "http://minio:9000"},
            ],
            "disk_budget_bytes": 10 << 20,
            "max_adapter_bytes": 1 << 20,
            "on_demand": True,
            "fallback": "base",
            "compatible_bases": ["old-name"],
            "pinned": ["code@stable", "legal"],
        }
    )
    assert isinstance(settings.sources[0], LocalSourceSettings)
    assert isinstance(settings.sources[1], S3SourceSettings)
    assert StoreSettings(root="/x", fallback="code").fallback == "code"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"cache_size": 3}, "Extra inputs are not permitted"),
        ({"sources": [{"type": "ftp", "roots": ["/x"]}]}, "does not match any of the expected tags"),
        ({"sources": [{"type": "local", "roots": []}]}, "at least 1 item"),
        ({"sources": [{"type": "s3", "url_prefixes": ["s3://bucket/no-slash"]}]}, "ending in '/'"),
        ({"sources": [{"type": "s3", "url_prefixes": ["https://bucket/x/"]}]}, "must look like s3://bucket/"),
        ({"fallback": "anything goes"}, "fallback must be 'error', 'base' or an adapter name"),
        ({"pinned": ["code@abc"]}, "at least 8 hex digits"),
        ({"max_adapter_bytes": 2 << 30}, "exceeds disk_budget_bytes"),
        ({"on_demand": True}, "no sources are configured"),
        ({"disk_budget_bytes": 0}, "greater than 0"),
    ],
)
def test_invalid_settings(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        StoreSettings.model_validate({"root": "/x", **overrides})
    assert fragment in str(info.value)
