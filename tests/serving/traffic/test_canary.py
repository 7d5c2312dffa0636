"""Automatic canary on real models in process: promotion, rollback with a reason, restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from serving.config import RolloutBounds, RouteConfig, load_config
from serving.errors import FermionError
from serving.inference.repository import ModelRepository
from serving.observability.metrics import GatewayMetrics
from serving.traffic.canary import (
    RolloutConflict,
    RolloutController,
    RolloutSpec,
    RolloutState,
    StepRecord,
    judge,
)
from serving.traffic.route_file import RouteFile
from serving.traffic.route_table import RouteTable
from serving.traffic.windows import LatencyFigures, ShadowFigures
from tests.helpers.ab_models import FAIL_AT, MODEL, step_verdicts
from tests.serving.traffic.infer_calls import infer, service

#: Loose enough for a busy 2-core machine; the faults below overshoot them by far.
_BOUNDS = {"min_requests": 5, "max_p99_ratio": 3.0, "p99_slack_ms": 30.0}


def _gateway(repo: ModelRepository, tmp: Path) -> tuple[RouteTable, RolloutController, Path]:
    """A route table and a controller as the gateway builds them from ``tmp/fermion.yaml``."""
    config_path = tmp / "fermion.yaml"
    if not config_path.exists():
        config_path.write_text(
            f"# written by the test\nserver: {{port: 8123}}\nroutes:\n  {MODEL}:\n"
            f"    split: {{'1': 100}}\n    rollout: {json.dumps(_BOUNDS)}\n"
        )
    config = load_config(config_path)
    router = RouteTable(config.routes, repo, route_file=RouteFile(config_path))
    state_path = tmp / "fermion.rollouts.json"
    return router, RolloutController(router, repo, state_path), config_path


def _metrics(controller: RolloutController) -> GatewayMetrics:
    """The gateway's registry, exporting this controller's rollout families."""
    metrics = GatewayMetrics()
    metrics.register(controller)
    return metrics


@dataclass
class _Answers:
    """What the clients got, by the version that took each request."""

    ok: Counter[int] = field(default_factory=Counter)
    errors: dict[int, list[str]] = field(default_factory=dict)


def _served(state: dict[str, object]) -> int:
    """The version that took a request, from its call's state."""
    served = state["served"]
    assert isinstance(served, tuple)
    return int(served[1])


@contextlib.asynccontextmanager
async def _traffic(
    router: RouteTable, repo: ModelRepository, make_x: Callable[[int], np.ndarray]
) -> AsyncIterator[_Answers]:
    """Two clients sending requests through the route until the block ends."""
    done = asyncio.Event()
    svc = service(router, repo)
    answers = _Answers()

    async def client(seed: int) -> None:
        i = seed
        while not done.is_set():
            x = make_x(i)
            i += 2
            state: dict[str, object] = {}
            try:
                await infer(svc, x, state=state)
            except FermionError as e:
                answers.errors.setdefault(_served(state), []).append(e.message)
            else:
                answers.ok[_served(state)] += 1
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(client(s)) for s in range(2)]
    try:
        yield answers
    finally:
        done.set()
        await asyncio.gather(*tasks)


async def _finish(controller: RolloutController, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while controller.running(MODEL) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not controller.running(MODEL), controller.state(MODEL)


def _good(i: int) -> np.ndarray:
    return np.random.default_rng(i).random((1, 4)).astype(np.float32)


def _verdicts(history: list[StepRecord]) -> list[str]:
    return step_verdicts([h.model_dump() for h in history])


def _split(config_path: Path) -> dict[int, float]:
    return load_config(config_path).routes[MODEL].split


def test_judge_names_the_breach() -> None:
    bounds = RolloutBounds(max_error_rate_increase=0.01, max_p99_ratio=1.5, p99_slack_ms=5)
    fine = LatencyFigures(100, 1, tuple([10.0] * 99))
    assert judge(bounds, 0.0, 10.0, fine) == ""
    assert "error rate 5.00% over the bound 1.00%" in judge(
        bounds, 0.0, 10.0, LatencyFigures(100, 5, tuple([10.0] * 95))
    )
    slow = LatencyFigures(100, 0, tuple([10.0] * 90 + [50.0] * 10))
    assert "p99 latency 50.0 ms over the bound 20.0 ms" in judge(bounds, 0.0, 10.0, slow)
    assert judge(bounds, 0.0, None, slow) == ""  # no baseline latency: not judged
    strict = bounds.model_copy(update={"min_top1_agreement": 0.95, "max_abs_diff": 0.5})
    shadow = ShadowFigures(mirrored=10, rows=100, agree_rows=90, top1_rows=100, max_abs_diff=0.1)
    assert "top-1 agreement 90.00% under the bound 95.00%" in judge(
        strict, 0.0, None, LatencyFigures(), shadow
    )
    far = ShadowFigures(mirrored=10, rows=10, agree_rows=10, top1_rows=10, max_abs_diff=2.0)
    assert "max abs difference 2 over the bound 0.5" in judge(
        strict, 0.0, None, LatencyFigures(), far
    )
    failing = ShadowFigures(mirrored=10, errors=3)
    assert "shadow error rate" in judge(strict, 0.0, None, LatencyFigures(), failing)


@pytest.mark.parametrize("steps", [[], [5, 5], [50, 20], [0, 10], [10, 101]])
def test_steps_must_increase_within_0_100(steps: list[float]) -> None:
    with pytest.raises(ValueError, match="steps"):
        RolloutSpec.model_validate({"to": 2, "steps": steps})


async def test_a_healthy_candidate_is_promoted(repository: ModelRepository, tmp_path: Path) -> None:
    router, controller, config_path = _gateway(repository, tmp_path)
    async with _traffic(router, repository, _good) as answers:
        state = await controller.begin(MODEL, RolloutSpec(to=2, steps=[30, 100], interval_s=0.3))
        assert state.percent == 30 and _split(config_path) == {1: 70, 2: 30}
        await _finish(controller)
    assert state.status == "promoted", state.reason
    assert answers.errors == {} and answers.ok[1] > 0 and answers.ok[2] > 0, answers
    assert _verdicts(state.history) == ["pass", "pass"]
    assert all(h.candidate["requests"] >= 5 for h in state.history)  # type: ignore[operator]
    route = router.get(MODEL)
    assert route is not None and route.split.shares() == {1: 0.0, 2: 1.0}
    assert _split(config_path) == {1: 0.0, 2: 100.0}
    assert "server" in load_config(config_path).model_fields_set  # other keys kept
    saved = json.loads((tmp_path / "fermion.rollouts.json").read_text())["rollouts"][0]
    assert saved["status"] == "promoted" and saved["percent"] == 100
    labels = {"model": MODEL, "candidate": "2"}
    registry = _metrics(controller).registry
    assert registry.get_sample_value("fermion_rollout_step_percent", labels) == 100


async def test_a_candidate_failing_on_some_inputs_is_rolled_back(
    repository: ModelRepository, tmp_path: Path
) -> None:
    router, controller, config_path = _gateway(repository, tmp_path)
    registry = _metrics(controller).registry
    before = registry.get_sample_value("fermion_rollout_rollbacks_total", {"model": MODEL}) or 0

    def some_bad(i: int) -> np.ndarray:
        x = _good(i)
        if i % 3 == 0:
            x[0, 0] = FAIL_AT + 1  # version 3 fails on these
        return x

    async with _traffic(router, repository, some_bad) as answers:
        state = await controller.begin(
            MODEL, RolloutSpec(to=3, steps=[30, 60, 100], interval_s=0.3)
        )
        await _finish(controller)
    assert state.status == "rolled_back"
    # Only the candidate failed: the baseline answered every request it took.
    assert set(answers.errors) == {3} and answers.ok[1] > 0, answers
    assert all("inference failed" in e for e in answers.errors[3]), answers.errors[3][:3]
    assert state.reason.startswith("error rate"), state.reason
    last = state.history[-1]
    assert last.verdict == "breach" and last.candidate["errors"] > 0  # type: ignore[operator]
    assert last.baseline["errors"] == 0
    assert _split(config_path) == {1: 100.0, 3: 0.0}
    assert registry.get_sample_value("fermion_rollout_rollbacks_total", {"model": MODEL}) == (
        before + 1
    )
    assert registry.get_sample_value(
        "fermion_rollout_step_percent", {"model": MODEL, "candidate": "3"}
    ) == (0)


def _heavy(i: int) -> np.ndarray:
    x = _good(i)
    x[0, 3] = 100.0  # version 4 spins ~0.3 s on these; version 1 takes ~0.1 ms
    return x


async def _roll_to_slow(
    repo: ModelRepository,
    tmp: Path,
    make_x: Callable[[int], np.ndarray],
    interval_s: float = 0.5,
    began: Callable[[], None] = lambda: None,
    **bounds: object,
) -> tuple[RolloutState, _Answers]:
    """A rollout of version 4 (slow on a large ``x[:, 3]``) to 50%, under ``make_x`` traffic;
    ``began`` is called once the candidate has its share."""
    router, controller, _ = _gateway(repo, tmp)
    async with _traffic(router, repo, make_x) as answers:
        spec = RolloutSpec.model_validate(
            {
                "to": 4,
                "steps": [50],
                "interval_s": interval_s,
                "bounds": _BOUNDS | {"min_requests": 2} | bounds,
            }
        )
        state = await controller.begin(MODEL, spec)
        began()
        await _finish(controller)
    return state, answers


async def test_a_slow_candidate_is_rolled_back_on_p99(
    repository: ModelRepository, tmp_path: Path
) -> None:
    state, answers = await _roll_to_slow(repository, tmp_path, _heavy)
    assert state.status == "rolled_back"
    assert answers.errors == {} and answers.ok[1] > 0 and answers.ok[4] > 0, answers
    assert state.reason.startswith("p99 latency"), state.reason
    # Slow in every interval: the first breach holds the step, the second rolls back.
    assert [h.verdict for h in state.history] == ["hold", "breach"]
    assert all(h.reason.startswith("p99 latency") for h in state.history)


async def test_one_slow_interval_holds_the_step_and_a_fast_one_passes_it(
    repository: ModelRepository, tmp_path: Path
) -> None:
    """A pause that catches the candidate's requests in flight (a host stall, a collector
    pass) breaches one interval's p99; it must not roll a healthy version back."""
    stall_until: list[float] = []

    def stalled_then_fast(i: int) -> np.ndarray:
        # The candidate's requests of its first 0.4 s spin ~0.3 s each, a few per client (a
        # client waits for its answer): several per cent of the first interval's requests,
        # answered inside it, so its p99 is one of them. The second interval is all fast.
        return _heavy(i) if stall_until and time.monotonic() < stall_until[0] else _good(i)

    def began() -> None:
        stall_until.append(time.monotonic() + 0.4)

    state, answers = await _roll_to_slow(repository, tmp_path, stalled_then_fast, 1.5, began)
    assert state.status == "promoted", state.reason
    assert answers.errors == {} and answers.ok[4] > 0, answers
    assert [h.verdict for h in state.history] == ["hold", "pass"], state.history
    assert state.history[0].reason.startswith("p99 latency"), state.history[0]


async def test_p99_breaches_1_rolls_back_on_the_first_slow_interval(
    repository: ModelRepository, tmp_path: Path
) -> None:
    state, _ = await _roll_to_slow(repository, tmp_path, _heavy, p99_breaches=1)
    assert state.status == "rolled_back" and state.reason.startswith("p99 latency")
    assert [h.verdict for h in state.history] == ["breach"]


async def test_a_disagreeing_candidate_is_stopped_in_the_shadow_phase(
    repository: ModelRepository, tmp_path: Path
) -> None:
    router, controller, config_path = _gateway(repository, tmp_path)

    def spread(i: int) -> np.ndarray:
        return np.random.default_rng(i).normal(size=(4, 4)).astype(np.float32)

    async with _traffic(router, repository, spread) as answers:
        spec = RolloutSpec.model_validate(
            {
                "to": 2,
                "steps": [10, 100],
                "interval_s": 0.3,
                "shadow_percent": 100,
                "bounds": _BOUNDS | {"min_top1_agreement": 0.99},
            }
        )
        state = await controller.begin(MODEL, spec)
        route = router.get(MODEL)
        assert route is not None and route.shadow is not None and route.shadow.version == 2
        assert route.split.shares()[2] == 0.0  # the candidate gets mirrored traffic only
        await _finish(controller)
    assert state.status == "rolled_back"
    assert state.reason.startswith("top-1 agreement"), state.reason
    assert answers.errors == {} and set(answers.ok) == {1}, answers  # version 2 only mirrored
    assert [h.phase for h in state.history] == ["shadow"]
    shadow = state.history[0].shadow
    assert shadow is not None and shadow["mirrored"] >= 5  # type: ignore[operator]
    route = router.get(MODEL)
    assert route is not None and route.shadow is None  # the route's own shadow is back
    assert _split(config_path) == {1: 100.0, 2: 0.0}


async def test_a_rollout_resumes_after_a_restart(
    repository: ModelRepository, tmp_path: Path
) -> None:
    router, controller, config_path = _gateway(repository, tmp_path)
    async with _traffic(router, repository, _good) as answers:
        state = await controller.begin(MODEL, RolloutSpec(to=2, steps=[20, 50], interval_s=0.4))
        state_file = tmp_path / "fermion.rollouts.json"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and '"step_index": 1' not in state_file.read_text():
            await asyncio.sleep(0.02)
        await controller.stop()  # the gateway shuts down mid-rollout
    assert answers.errors == {}, answers
    saved = json.loads(state_file.read_text())["rollouts"][0]
    assert saved["status"] == "running" and saved["step_index"] == 1
    assert _verdicts(state.history)[0] == "pass"
    assert _split(config_path) == {1: 50.0, 2: 50.0}

    router, controller, _ = _gateway(repository, tmp_path)  # a new gateway, same files
    route = router.get(MODEL)
    assert route is not None and route.split.shares()[2] == 0.5
    async with _traffic(router, repository, _good) as answers:
        await controller.start()
        assert controller.running(MODEL)
        await _finish(controller)
    assert answers.errors == {}, answers
    resumed = controller.state(MODEL)
    assert resumed.status == "promoted" and _verdicts(resumed.history) == ["pass", "pass"]


async def test_routes_are_locked_while_a_rollout_runs_and_stop_rolls_back(
    repository: ModelRepository, tmp_path: Path
) -> None:
    routes, controller, config_path = _gateway(repository, tmp_path)
    await controller.begin(MODEL, RolloutSpec(to=2, steps=[10, 100], interval_s=30))
    with pytest.raises(RolloutConflict, match=f"a rollout of {MODEL} is running; stop it first"):
        await routes.set_route(MODEL, RouteConfig(split={1: 1}))
    with pytest.raises(RolloutConflict, match=f"a rollout of {MODEL} is already running"):
        await controller.begin(MODEL, RolloutSpec(to=2))
    state = await controller.abort(MODEL)
    assert state.status == "stopped" and state.reason == "stopped by an operator"
    assert _split(config_path) == {1: 100.0, 2: 0.0}
    await routes.set_route(MODEL, RouteConfig(split={1: 1, 2: 3}))
    assert _split(config_path) == {1: 1.0, 2: 3.0}
    with pytest.raises(FermionError, match="unknown version"):
        await routes.set_route(MODEL, RouteConfig(split={1: 1, 9: 1}))
