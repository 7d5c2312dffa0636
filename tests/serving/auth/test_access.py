"""The access decision both transports share: where the credential is, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.auth import AccessControl, ApiKeys, create_key, credential
from serving.auth.scopes import ADMIN, INFER, READ
from serving.errors import Forbidden, Unauthorized


def test_the_credential_is_a_bearer_token_else_the_api_key() -> None:
    assert credential("Bearer abc", None) == "abc"
    assert credential("bearer  abc ", "key") == "abc"
    assert credential("Basic abc", "key") == "key"
    assert credential("Bearer ", " key ") == "key"
    assert credential(None, "  ") is None
    assert credential(None, None) is None


def test_check_names_the_missing_scope_and_counts_refusals(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    reader = create_key(path, "reader", ["read"])
    refused: list[tuple[str, str]] = []
    access = AccessControl(keys=ApiKeys(path), on_reject=lambda m, r: refused.append((m, r)))
    assert access.check(reader, READ).name == "reader"
    with pytest.raises(Forbidden, match="lacks the scope infer:digits"):
        access.check(reader, INFER, "digits")
    with pytest.raises(Forbidden, match="lacks the scope admin"):
        access.check(reader, ADMIN)
    with pytest.raises(Unauthorized, match="missing or invalid credentials"):
        access.check("fmn_unknown", READ)
    with pytest.raises(Unauthorized):
        access.check(None, INFER, "digits")
    assert refused == [
        ("digits", "forbidden"),
        ("", "forbidden"),
        ("", "unauthenticated"),
        ("digits", "unauthenticated"),
    ]
