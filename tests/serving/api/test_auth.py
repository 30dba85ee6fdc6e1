"""API keys: hashing, lookup, the bearer header, tenant visibility."""

from __future__ import annotations

import pytest

from serving.api.auth import OPEN_PRINCIPAL, KeyEntry, KeyStore, Principal, bearer_token, hash_key, new_key
from serving.config import AuthSettings, ConfigError


def store(*entries: tuple[str, str, str | None, str]) -> KeyStore:
    return KeyStore([KeyEntry(id=i, sha256=hash_key(k), tenant=t, role=r) for i, k, t, r in entries])


def test_verify_finds_only_the_matching_key():
    keys = store(("a", "sk-a", "t1", "user"), ("b", "sk-b", None, "admin"))
    assert keys.verify("sk-a").id == "a"
    assert keys.verify("sk-b").role == "admin"
    assert keys.verify("sk-c") is None
    assert keys.verify("") is None


def test_new_keys_are_random_and_prefixed():
    a, b = new_key(), new_key()
    assert a != b and a.startswith("sk-ls-") and len(a) > 40


def test_duplicate_ids_are_refused():
    with pytest.raises(ConfigError, match="unique"):
        store(("a", "k1", None, "user"), ("a", "k2", None, "user"))


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([(b"authorization", b"Bearer sk-1")], "sk-1"),
        ([(b"authorization", b"bearer  sk-1 ")], "sk-1"),
        ([(b"authorization", b"Basic dXNlcg==")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([], None),
    ],
)
def test_bearer_token(headers, token):
    assert bearer_token({"headers": headers}) == token


@pytest.mark.parametrize(
    ("principal", "owner", "allowed"),
    [
        (Principal("h", "hospital", "user"), None, True),
        (Principal("h", "hospital", "user"), "hospital", True),
        (Principal("h", "hospital", "user"), "lawfirm", False),
        (Principal("p", None, "user"), "lawfirm", False),
        (Principal("ops", None, "admin"), "lawfirm", True),
        (OPEN_PRINCIPAL, "lawfirm", True),
    ],
)
def test_may_use(principal, owner, allowed):
    assert principal.may_use(owner) is allowed


def test_keys_from_environment(monkeypatch):
    monkeypatch.setenv("LS_TEST_KEYS", f"keys:\n  - id: env\n    sha256: {hash_key('sk-env')}\n")
    keys = KeyStore.from_settings(AuthSettings(mode="api_keys", keys_env="LS_TEST_KEYS"))
    assert keys.verify("sk-env").id == "env"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: [{id: x, sha256: nothex}]", "sha256"),
        ("keys: [{id: x, sha256: %s, secret: 1}]" % ("0" * 64), "secret"),
        ("[unclosed", "invalid"),
    ],
)
def test_bad_keys_file_names_the_problem(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        KeyStore.from_settings(AuthSettings(mode="api_keys", keys_file=path))


def test_open_mode_has_no_store():
    assert KeyStore.from_settings(AuthSettings(mode="open")) is None
