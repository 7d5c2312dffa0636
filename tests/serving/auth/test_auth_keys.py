"""API keys: hashes only on disk, expiry, revocation seen by a running verifier, scopes."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serving.auth import ApiKeys, Principal, create_key, read_keys, required_scope, revoke_key
from serving.auth import keys as keys_module
from serving.auth.scopes import infer_model, parse_scopes
from serving.cli import main
from tests.helpers.spies import spy


def test_keys_file_holds_only_a_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "ci", ["infer:digits", "read"])
    text = path.read_text()
    assert key not in text
    assert key[4:] not in text  # not even without its prefix
    (record,) = read_keys(path)
    assert record.name == "ci"
    assert record.scopes == ("infer:digits", "read")
    assert len(record.sha256) == 64
    assert os.stat(path).st_mode & 0o077 == 0  # readable by its owner only


def test_keys_are_random_and_names_unique(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    a = create_key(path, "a", ["read"])
    b = create_key(path, "b", ["read"])
    assert a != b
    with pytest.raises(ValueError, match="exists"):
        create_key(path, "a", ["read"])
    replaced = create_key(path, "a", ["admin"], replace=True)
    keys = ApiKeys(path)
    assert keys.authenticate(a) is None
    principal = keys.authenticate(replaced)
    assert principal is not None and principal.admin


@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        (["write"], "unknown scope 'write'"),
        (["infer:"], "unknown scope 'infer:'"),
        (["infer:a/b"], "unknown scope 'infer:a/b'"),
        ([], "at least one scope"),
    ],
)
def test_unknown_scopes_are_refused(tmp_path: Path, scopes: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_key(tmp_path / "keys.json", "x", scopes)
    assert not (tmp_path / "keys.json").exists()


def test_verifier_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = ApiKeys(path, check_interval_s=0)  # no file yet: every key refused
    key = create_key(path, "late", ["read"])
    principal = keys.authenticate(key)
    assert principal is not None and principal.name == "late"
    assert keys.authenticate(key + "x") is None
    assert revoke_key(path, "late")
    assert keys.authenticate(key) is None
    assert not revoke_key(path, "late")


def test_expired_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    soon = datetime.now(UTC) + timedelta(hours=1)
    live = create_key(path, "live", ["read"], expires_at=soon)
    old = create_key(path, "old", ["read"], expires_at=datetime.now(UTC) - timedelta(seconds=1))
    keys = ApiKeys(path)
    assert keys.authenticate(live) is not None
    assert keys.authenticate(old) is None


def test_a_verified_key_is_hashed_once_and_an_unknown_one_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "k", ["read"])
    hashed = spy(monkeypatch, keys_module, "hash_key")
    keys = ApiKeys(path, check_interval_s=3600)
    for _ in range(3):
        principal = keys.authenticate(key)
        assert principal is not None and principal.name == "k"
    assert hashed == [key]
    for _ in range(2):
        assert keys.authenticate(key + "x") is None
    assert hashed == [key, key + "x", key + "x"]  # never remembered


def test_a_remembered_key_is_forgotten_when_revoked_or_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    revoked = create_key(path, "revoked", ["read"])
    expiring = create_key(
        path, "expiring", ["read"], expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    keys = ApiKeys(path)
    assert keys.authenticate(revoked) is not None
    assert keys.authenticate(expiring) is not None
    assert revoke_key(path, "revoked")
    time.sleep(0.06)  # past the check interval
    assert keys.authenticate(revoked) is None
    assert keys.authenticate(expiring) is not None
    later = time.time() + 2 * 3600
    monkeypatch.setattr(time, "time", lambda: later)  # (the module keys.py reads it from)
    assert keys.authenticate(expiring) is None


def test_remembered_keys_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_module, "_VERIFIED_MAX", 2)
    path = tmp_path / "keys.json"
    made = [create_key(path, f"k{i}", ["read"]) for i in range(5)]
    keys = ApiKeys(path, check_interval_s=3600)
    for key in made:
        assert keys.authenticate(key) is not None
        assert len(keys._verified) <= 2
    for key in made:  # forgotten ones are looked up again
        assert keys.authenticate(key) is not None


def test_corrupt_file_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = create_key(path, "k", ["read"])
    keys = ApiKeys(path)
    assert keys.authenticate(key) is not None
    path.write_text("{not json")
    time.sleep(0.06)  # past the check interval
    assert keys.authenticate(key) is None


def test_scopes_per_route() -> None:
    assert required_scope("GET", "/v2/health/ready") == ("open", "")
    assert required_scope("POST", "/v2/models/digits/versions/2/infer") == ("infer", "digits")
    assert required_scope("GET", "/v2/models/digits") == ("read", "")
    assert required_scope("POST", "/v2/repository/models/digits/load") == ("admin", "")
    assert required_scope("PUT", "/admin/routes/digits") == ("admin", "")
    p = Principal("p", ["infer:dig*", "admin", "bogus"])
    assert p.allows("infer", "digits") and not p.allows("infer", "mnist")
    assert p.allows("read") and p.allows("admin")
    assert p.scopes == ("infer:dig*", "admin")
    reader = Principal("r", ["read"])
    assert reader.allows("read") and not reader.allows("admin")
    assert not reader.allows("infer", "digits")


def test_health_needs_nothing_and_an_unknown_kind_is_refused() -> None:
    nobody = Principal("n", [])
    assert nobody.allows("open") and not nobody.allows("read")
    assert not Principal("all", ["admin", "read", "infer:*"]).allows("bogus")


def test_a_post_that_is_no_inference_names_no_model() -> None:
    assert infer_model("POST", "/v2/repository/index") is None
    assert infer_model("GET", "/v2/models/digits/infer") is None
    assert infer_model("POST", "/v2/models/digits/infer") == "digits"
    assert required_scope("POST", "/v2/models/digits/generate") == ("read", "")


def test_blank_scopes_are_skipped_not_the_end_of_the_list() -> None:
    assert parse_scopes(["", " ", "read", " infer:a* ", "read"]) == ("read", "infer:a*")
    assert Principal("p", ["", "admin"]).admin


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    args = ["--file", str(path)]
    assert main(["keys", "create", "--name", "ci", "--scopes", "infer:*,read", *args]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("fmn_")
    assert ApiKeys(path).authenticate(key) is not None
    assert (
        main(["keys", "create", "--name", "tmp", "--scopes", "read", "--expires-in", "1h", *args])
        == 0
    )
    capsys.readouterr()
    assert main(["keys", "list", *args]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and "infer:*,read" in listing and key not in listing
    assert main(["keys", "list", "--json", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["ci", "tmp"] and "sha256" not in rows[0]
    # --expires-in 1h: an hour from the command (made just before the record's created_at).
    expires_in = datetime.fromisoformat(rows[1]["expires_at"]) - datetime.fromisoformat(
        rows[1]["created_at"]
    )
    assert timedelta(minutes=59) < expires_in <= timedelta(hours=1)
    assert main(["keys", "revoke", "ci", *args]) == 0
    assert ApiKeys(path).authenticate(key) is None
    assert main(["keys", "revoke", "ci", *args]) == 2  # no such key: what was asked does not exist
    assert main(["keys", "create", "--name", "x", "--scopes", "write", *args]) == 2
