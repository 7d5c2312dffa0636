"""API keys: a JSON keys file holding only sha256 hashes, names, scopes and expiry.

``fermion keys create|list|revoke`` edit the file (atomically, under a lock);
a running gateway notices the change on the next request (one ``stat``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.atomic_file import write_atomically
from serving.auth.scopes import Principal, parse_scopes

__all__ = [
    "ApiKeys",
    "KeyRecord",
    "create_key",
    "hash_key",
    "read_keys",
    "revoke_key",
]

log = logging.getLogger("fermion.auth")

_PREFIX = "fmn_"
#: Keys remembered once verified, at most (past it all are forgotten).
_VERIFIED_MAX = 1024
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_key(key: str) -> str:
    """The hex sha256 of a key: all the keys file ever holds of it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One entry of the keys file."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """True once the expiry has passed."""
        return self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "scopes": list(self.scopes),
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> KeyRecord:
        if not isinstance(data, dict):
            raise ValueError("each key must be a JSON object")
        digest = data.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"key {data.get('name')!r}: sha256 must be 64 hex digits")
        expires = data.get("expires_at")
        return cls(
            name=str(data["name"]),
            sha256=digest,
            scopes=parse_scopes(data.get("scopes", []), strict=False),
            created_at=datetime.fromisoformat(data["created_at"]),
            expires_at=datetime.fromisoformat(expires) if expires else None,
        )


def read_keys(path: Path) -> list[KeyRecord]:
    """Every key in ``path`` (empty when the file does not exist)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read keys file {path}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise ValueError(f'keys file {path} must hold {{"keys": [...]}}')
    try:
        return [KeyRecord.from_json(k) for k in raw["keys"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid keys file {path}: {e}") from e


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: Path, records: Sequence[KeyRecord]) -> None:
    data = json.dumps({"keys": [r.to_json() for r in records]}, indent=2) + "\n"
    write_atomically(path, data, mode=0o600)


def create_key(
    path: Path,
    name: str,
    scopes: Sequence[str],
    *,
    expires_at: datetime | None = None,
    replace: bool = False,
) -> str:
    """Add a key named ``name`` and return it; only its hash is stored.

    ``replace`` swaps out an existing key of that name (else that is an error).
    """
    if not _NAME.match(name):
        raise ValueError(f"invalid key name {name!r}: 1-64 letters, digits, _ . @ -")
    checked = parse_scopes(scopes)
    if not checked:
        raise ValueError("a key needs at least one scope")
    key = _PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(name, hash_key(key), checked, datetime.now(UTC), expires_at)
    with _locked(path):
        records = read_keys(path)
        if any(r.name == name for r in records):
            if not replace:
                raise ValueError(f"a key named {name!r} exists; revoke it first")
            records = [r for r in records if r.name != name]
        _write(path, [*records, record])
    return key


def revoke_key(path: Path, name: str) -> bool:
    """Remove the key named ``name``; False when there was none."""
    with _locked(path):
        records = read_keys(path)
        kept = [r for r in records if r.name != name]
        if len(kept) == len(records):
            return False
        _write(path, kept)
    return True


class ApiKeys:
    """Looks keys up in a keys file, reloading it when it changes (fails closed).

    The file is checked (one ``stat``) at most every ``check_interval_s`` and on
    every unknown key: a new key works at once, a revoked one stops within the
    interval.

    A key found in the file is remembered (up to ``_VERIFIED_MAX`` of them) until the
    file is next read, as ``JwtVerifier`` remembers tokens, so that its caller's later
    requests skip the sha256: hashing was about 16 µs of a request's time in the gateway
    (``bench.gateway_overhead``). Only keys the file holds are remembered, so unknown
    keys cannot grow it; expiry is checked on every use. (The lookup compares a key's
    string only with an entry of the same randomised ``hash()``: its time tells nothing
    about a key held.)
    """

    def __init__(self, path: Path, *, check_interval_s: float = 0.05) -> None:
        self.path = path
        self._file = os.fspath(path)
        self._interval = check_interval_s
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, tuple[str, Principal]] = {}
        self._verified: dict[str, Principal] = {}
        self._reload(time.monotonic())

    def _reload(self, now: float) -> None:
        self._next_check = now + self._interval
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            self._stamp, self._by_hash, self._verified = None, {}, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._verified = {}
        try:
            records = read_keys(self.path)
        except ValueError as e:
            log.error("%s; refusing every key until it is fixed", e)
            self._by_hash = {}
            return
        self._by_hash = {
            r.sha256: (
                r.sha256,
                Principal(r.name, r.scopes, r.expires_at.timestamp() if r.expires_at else None),
            )
            for r in records
        }
        log.info("loaded %d API key(s) from %s", len(records), self.path)

    def authenticate(self, key: str) -> Principal | None:
        """The caller holding ``key``, or None for an unknown, revoked or expired key."""
        now = time.monotonic()
        if now >= self._next_check:
            self._reload(now)
        principal = self._verified.get(key)
        if principal is None:
            principal = self._lookup(key, now)
            if principal is None:
                return None
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            return None
        return principal

    def _lookup(self, key: str, now: float) -> Principal | None:
        """The principal of ``key`` by its hash, remembered; None for a key not held."""
        digest = hash_key(key)
        entry = self._by_hash.get(digest)
        if entry is None:
            self._reload(now)  # perhaps created since the last check
            entry = self._by_hash.get(digest)
        if entry is None or not secrets.compare_digest(entry[0], digest):
            return None
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = entry[1]
        return entry[1]
