"""The ASGI middlewares in front of uploads: a non-admin's body is never read, an upload is
counted as it streams instead of being held in memory."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from serving.api.auth import AuthMiddleware, KeyEntry, KeyStore, hash_key
from serving.api.errors import PayloadTooLargeError
from serving.api.limits import BodySizeLimitMiddleware

KEYS = KeyStore(
    [
        KeyEntry(id="user", sha256=hash_key("sk-user"), role="user"),
        KeyEntry(id="admin", sha256=hash_key("sk-admin"), role="admin"),
    ]
)


def scope(method: str, path: str, key: str | None = None, length: int | None = None) -> dict:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers, "app": SimpleNamespace(state=None)}


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def error(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))["error"]


def chunks(*sizes: int) -> tuple[list[int], callable]:
    """A receive that hands out bodies of ``sizes`` and records how many were read."""
    read: list[int] = []

    async def receive() -> dict:
        size = sizes[len(read)]
        read.append(size)
        return {"type": "http.request", "body": b"x" * size, "more_body": len(read) < len(sizes)}

    return read, receive


async def reading_app(scope, receive, send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/adapters/evil/versions"),
        ("POST", "/v1/adapters"),
        ("DELETE", "/v1/adapters/evil"),
        ("PUT", "/v1/adapters/evil@1/pin"),
        ("PUT", "/admin/routes/r"),
    ],
)
def test_a_user_key_on_an_admin_write_gets_403_before_the_body_is_read(method, path):
    read, receive = chunks(1 << 20, 1 << 20)
    sent = Sent()
    asyncio.run(AuthMiddleware(reading_app, KEYS)(scope(method, path, "sk-user"), receive, sent))
    assert sent.status == 403 and sent.error["code"] == "permission_denied"
    assert read == []


@pytest.mark.parametrize(
    ("method", "path", "key"),
    [
        ("POST", "/v1/adapters/evil/versions", "sk-admin"),
        ("GET", "/v1/adapters/evil@1/health", "sk-user"),  # a user's own read stays a route's decision
        ("POST", "/v1/completions", "sk-user"),
    ],
)
def test_admins_and_user_routes_pass_through(method, path, key):
    read, receive = chunks(10)
    sent = Sent()
    asyncio.run(AuthMiddleware(reading_app, KEYS)(scope(method, path, key), receive, sent))
    assert sent.status == 201 and read == [10]


def test_an_upload_streams_through_and_the_read_that_crosses_the_limit_raises_413():
    seen: list[int] = []

    async def app(scope, receive, send) -> None:
        while True:
            message = await receive()
            seen.append(len(message["body"]))  # each chunk reaches the app as it arrives: nothing is buffered
            if not message.get("more_body"):
                break

    read, receive = chunks(400, 400, 400, 400)
    middleware = BodySizeLimitMiddleware(app, max_bytes=1024, max_upload_bytes=1000)
    with pytest.raises(PayloadTooLargeError, match="limits.max_upload_bytes"):
        asyncio.run(middleware(scope("POST", "/v1/adapters/a/versions"), receive, Sent()))
    assert seen == [400, 400] and read == [400, 400, 400]  # the rest was never read


def test_a_declared_upload_over_the_limit_is_refused_unread():
    read, receive = chunks(10)
    sent = Sent()
    middleware = BodySizeLimitMiddleware(reading_app, max_bytes=1024, max_upload_bytes=1000)
    asyncio.run(middleware(scope("POST", "/v1/adapters/a/versions", length=1001), receive, sent))
    assert sent.status == 413 and read == []


def test_other_bodies_are_still_bounded_before_the_app_runs():
    read, receive = chunks(600, 600, 600)
    sent = Sent()
    middleware = BodySizeLimitMiddleware(reading_app, max_bytes=1024, max_upload_bytes=1 << 20)
    asyncio.run(middleware(scope("POST", "/v1/completions"), receive, sent))
    assert sent.status == 413 and "limits.max_body_bytes" in sent.error["message"] and read == [600, 600]
