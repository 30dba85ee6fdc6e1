"""``loraserve adapters``: the adapter admin API from the command line, against a running server.

Every subcommand is one HTTP call to ``/v1/adapters``; the answer is printed
as JSON, and an error answer's message goes to stderr with exit status 1::

    loraserve adapters list
    loraserve adapters register support /mnt/adapters/support --alias stable --tenant acme
    loraserve adapters upload support ./my-adapter/
    loraserve adapters alias support stable 3f2a9c
    loraserve adapters pin support@stable
    loraserve adapters health support --check

The admin key comes from ``--api-key`` or the ``LORASERVE_API_KEY`` environment
variable (a secret: never a config file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_ENV = "LORASERVE_API_KEY"
TIMEOUT_S = 600.0  # a registration fetches, validates and health-checks

# subcommand -> (help, arguments, request builder: args -> (method, path, httpx keyword arguments))
Request = tuple[str, str, dict[str, Any]]


def _register(args: argparse.Namespace) -> Request:
    body = {"name": args.name, "source": args.source, "aliases": args.alias, "tenant": args.tenant}
    return "POST", "/v1/adapters", {"json": {**body, "check": not args.no_check}}


def _upload(args: argparse.Namespace) -> Request:
    directory: Path = args.directory
    if not directory.is_dir():
        raise SystemExit(f"loraserve: {directory} is not a directory")
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir()) if p.is_file()]
    data: dict[str, Any] = {"aliases": args.alias, "check": str(not args.no_check).lower()}
    if args.tenant:
        data["tenant"] = args.tenant
    return "POST", f"/v1/adapters/{args.name}/versions", {"files": files, "data": data}


COMMANDS: dict[str, tuple[str, list[tuple[tuple[str, ...], dict]], Callable[[argparse.Namespace], Request]]] = {
    "list": ("a page of adapters with their versions, and the cache tiers (--after LAST_ID: the next page)",
             [(("--after",), {}), (("--limit",), {"type": int, "default": 100})],
             lambda a: ("GET", "/v1/adapters", {"params": {"limit": a.limit} | ({"after": a.after} if a.after else {})})),
    "show": ("one adapter's versions, aliases, pins and health", [(("name",), {})],
             lambda a: ("GET", f"/v1/adapters/{a.name}", {})),
    "register": (
        "register a version from a source the server may read (path under a root, s3:// URL)",
        [(("name",), {}), (("source",), {}), (("--alias",), {"action": "append", "default": []}),
         (("--tenant",), {}), (("--no-check",), {"action": "store_true"})],
        _register,
    ),
    "upload": (
        "upload a local PEFT adapter directory as a new version",
        [(("name",), {}), (("directory",), {"type": Path}), (("--alias",), {"action": "append", "default": []}),
         (("--tenant",), {}), (("--no-check",), {"action": "store_true"})],
        _upload,
    ),
    "alias": ("point an alias at a version", [(("name",), {}), (("alias",), {}), (("version",), {})],
              lambda a: ("PUT", f"/v1/adapters/{a.name}/aliases/{a.alias}", {"json": {"version": a.version}})),
    "pin": ("keep a version on disk and loaded", [(("ref",), {})], lambda a: ("PUT", f"/v1/adapters/{a.ref}/pin", {})),
    "unpin": ("let a version be evicted again", [(("ref",), {})],
              lambda a: ("DELETE", f"/v1/adapters/{a.ref}/pin", {})),
    "unload": ("drop a version from the engine's caches", [(("ref",), {})],
               lambda a: ("POST", f"/v1/adapters/{a.ref}/unload", {})),
    "delete": ("delete a version (refused while pinned, aliased or in use)", [(("ref",), {})],
               lambda a: ("DELETE", f"/v1/adapters/{a.ref}", {})),
    "health": ("a version's last health check (--check: run one now)",
               [(("ref",), {}), (("--check",), {"action": "store_true"})],
               lambda a: ("POST" if a.check else "GET", f"/v1/adapters/{a.ref}/health", {})),
}  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    method, path, kwargs = args.build(args)
    key = args.api_key or os.environ.get(KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, headers=headers, timeout=TIMEOUT_S, **kwargs)
    except httpx.HTTPError as e:
        print(f"loraserve: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    if response.is_error:
        message = body["error"]["message"] if isinstance(body, dict) and "error" in body else response.text
        print(f"loraserve: {response.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    adapters = commands.add_parser("adapters", help="manage adapters on a running server (admin key)")
    adapters.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    adapters.add_argument("--api-key", help=f"admin API key (default: ${KEY_ENV})")
    sub = adapters.add_subparsers(dest="adapters_command", required=True)
    for name, (help_text, arguments, build) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        for flags, options in arguments:
            command.add_argument(*flags, **options)
        command.set_defaults(handler=_run, build=build)
