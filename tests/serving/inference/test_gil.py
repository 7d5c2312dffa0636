"""The GIL switch interval the gateway process runs with."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from serving.config import FermionConfig
from serving.inference.gil import switch_interval


def test_the_interval_holds_inside_the_block_and_the_old_one_comes_back() -> None:
    before = sys.getswitchinterval()
    with switch_interval(0.0002):
        assert sys.getswitchinterval() == pytest.approx(0.0002)
    assert sys.getswitchinterval() == before


def test_the_old_interval_comes_back_when_the_block_fails() -> None:
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError), switch_interval(0.001):
        raise RuntimeError("the server stopped")
    assert sys.getswitchinterval() == before


def test_none_leaves_pythons_own_alone() -> None:
    before = sys.getswitchinterval()
    with switch_interval(None):
        assert sys.getswitchinterval() == before
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("seconds", [0.0, -0.001])
def test_an_interval_not_above_zero_is_refused(seconds: float) -> None:
    before = sys.getswitchinterval()
    with pytest.raises(ValueError, match="above 0"), switch_interval(seconds):
        pass
    assert sys.getswitchinterval() == before


def test_the_configured_default_is_shorter_than_pythons() -> None:
    assert FermionConfig().server.gil_switch_interval_ms == pytest.approx(0.2)
    assert (
        FermionConfig.model_validate(
            {"server": {"gil_switch_interval_ms": None}}
        ).server.gil_switch_interval_ms
        is None
    )
    with pytest.raises(ValidationError):
        FermionConfig.model_validate({"server": {"gil_switch_interval_ms": 0}})
