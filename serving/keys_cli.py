"""``loraserve keys``: make API keys and keep only their hashes.

``keys new`` prints a fresh key once and appends its SHA-256 digest (with the
key's id, tenant and role) to the keys file that ``auth.keys_file`` names. The
key itself is stored nowhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import ValidationError

from serving.api.auth import KeyEntry, KeysFile, hash_key, new_key
from serving.config import ConfigError


def _new(args: argparse.Namespace) -> int:
    path: Path = args.file
    entries: list[KeyEntry] = []
    if path.exists():
        try:
            entries = list(KeysFile.model_validate(yaml.safe_load(path.read_text())).keys)
        except Exception as e:
            raise ConfigError(f"{path} is not a keys file: {e}") from e
    if any(e.id == args.id for e in entries):
        raise ConfigError(f"key id {args.id!r} already exists in {path}; choose another id")
    key = new_key()
    try:
        entries.append(KeyEntry(id=args.id, sha256=hash_key(key), tenant=args.tenant, role=args.role))
    except ValidationError as e:
        raise ConfigError(f"invalid key: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(KeysFile(keys=entries).model_dump(exclude_none=True), sort_keys=False))
    tmp.replace(path)
    print(key)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys (hashed keys file)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser("new", help="create a key; prints it once and stores only its hash")
    new.add_argument("--file", type=Path, required=True, help="keys file (auth.keys_file)")
    new.add_argument("--id", required=True, help="name of the key, shown in logs")
    new.add_argument("--tenant", help="tenant whose adapters the key may use (omit: public adapters only)")
    new.add_argument(
        "--role",
        choices=["user", "metrics", "admin"],
        default="user",
        help="user: the API; metrics: GET /metrics only (a scraper's key); admin: everything",
    )
    new.set_defaults(handler=_new)
