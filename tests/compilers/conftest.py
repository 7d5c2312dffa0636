"""Fixtures of the compile tests (the trained demo is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.store import ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """An empty store."""
    return ModelStore(tmp_path / "store")
