"""``fermion rollout status`` as it prints a rollout's history."""

from __future__ import annotations

import pytest

from serving.cli.rollout import _print_state
from serving.config import RolloutBounds
from serving.traffic.canary import RolloutState, StepRecord


def _figures(requests: int, p99_ms: float) -> dict[str, float | int | None]:
    return {"requests": requests, "errors": 0, "error_rate": 0.0, "p99_ms": p99_ms}


def _step(verdict: str, candidate_p99_ms: float, reason: str = "") -> StepRecord:
    return StepRecord.model_validate(
        {
            "phase": "step",
            "percent": 50,
            "baseline": _figures(80, 8.1),
            "candidate": _figures(79, candidate_p99_ms),
            "verdict": verdict,
            "reason": reason,
            "at": 0,
        }
    )


def test_status_shows_why_a_step_was_held(capsys: pytest.CaptureFixture[str]) -> None:
    held = "p99 latency 123.3 ms over the bound 22.1 ms (baseline 8.1 ms x 1.5 + 10 ms)"
    state = RolloutState(
        model="clf",
        baseline=1,
        candidate=2,
        steps=[50, 100],
        interval_s=0.5,
        shadow_percent=0,
        bounds=RolloutBounds(),
        status="promoted",
        step_index=1,
        percent=100,
        reason="version 2 at 100% passed every step",
        history=[
            _step("hold", candidate_p99_ms=123.3, reason=held),
            _step("pass", candidate_p99_ms=9.0),
        ],
    )
    _print_state(state.model_dump())
    lines = capsys.readouterr().out.splitlines()
    assert "PROMOTED" in lines[0]
    hold, passed = lines[-2:]
    assert "hold" in hold and "p99 123.3 ms" in hold and hold.endswith(f"held: {held}")
    assert "pass" in passed and "held" not in passed
