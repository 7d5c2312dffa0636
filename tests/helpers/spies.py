"""Seeing what the code under test calls, the call still made."""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["spy"]


def spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Any]:
    """Wrap ``owner.name`` for the test: each call still goes through, and the list
    returned gets the call's first argument (None for a call without one)."""
    seen: list[Any] = []
    real = getattr(owner, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return seen
