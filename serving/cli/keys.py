"""``fermion keys create|list|revoke``: manage the API keys file (a running gateway follows it)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from serving.auth.keys import create_key, read_keys, revoke_key
from serving.cli._argtypes import duration_seconds
from serving.config import load_config

__all__ = ["DEFAULT_KEYS_FILE", "add_keys_parser"]

#: Keys file used when neither --file nor a config's auth.keys_file names one.
DEFAULT_KEYS_FILE = Path("fermion-keys.json")


def _keys_file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    if args.config is not None:
        path = load_config(args.config).auth.keys_file
        if path is None:
            raise ValueError(f"{args.config} sets no auth.keys_file")
        return path
    return DEFAULT_KEYS_FILE


def _create(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    expires = datetime.now(UTC) + timedelta(seconds=args.expires_in) if args.expires_in else None
    scopes = [s for s in args.scopes.split(",") if s.strip()]
    key = create_key(path, args.name, scopes, expires_at=expires, replace=args.replace)
    print(key)
    until = f", expires {expires.isoformat(timespec='seconds')}" if expires else ""
    print(
        f"created key {args.name!r} ({', '.join(scopes)}{until}) in {path}; "
        "it is shown only this once",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    records = read_keys(_keys_file(args))
    if args.json:
        rows = [{k: v for k, v in r.to_json().items() if k != "sha256"} for r in records]
        print(json.dumps(rows, indent=2))
        return 0
    if not records:
        print("no keys")
        return 0
    now = datetime.now(UTC)
    table = [("NAME", "SCOPES", "CREATED", "EXPIRES")]
    for r in records:
        expires = r.expires_at.isoformat(timespec="seconds") if r.expires_at else "never"
        if r.expired(now):
            expires += " (expired)"
        created = r.created_at.isoformat(timespec="seconds")
        table.append((r.name, ",".join(r.scopes), created, expires))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    if not revoke_key(path, args.name):
        print(f"fermion: no key named {args.name!r} in {path}", file=sys.stderr)
        return 2
    print(f"revoked key {args.name!r} in {path}")
    return 0


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys create|list|revoke`` to the ``fermion`` command line."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    def file_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", type=Path, help=f"keys file (default {DEFAULT_KEYS_FILE})")
        p.add_argument("--config", type=Path, help="take the keys file from auth.keys_file")

    p = ksub.add_parser("create", help="create a key and print it (only the hash is stored)")
    p.add_argument("--name", required=True, help="shown in logs and used by rate limits")
    p.add_argument(
        "--scopes", required=True, help="comma-separated: infer:<model glob>, read, admin"
    )
    p.add_argument("--expires-in", type=duration_seconds, help="e.g. 90s, 15m, 12h, 30d")
    p.add_argument("--replace", action="store_true", help="replace a key of the same name")
    file_args(p)
    p.set_defaults(func=_create)
    p = ksub.add_parser("list", help="names, scopes and expiry (never the keys)")
    p.add_argument("--json", action="store_true")
    file_args(p)
    p.set_defaults(func=_list)
    p = ksub.add_parser("revoke", help="remove a key; a running gateway refuses it at once")
    p.add_argument("name")
    file_args(p)
    p.set_defaults(func=_revoke)
