"""The ``ray:`` configuration and the Ray Serve deployment it describes (no cluster needed)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import numpy as np
import pytest

from model_store.store import ModelStore
from serving.config import ConfigError, load_config
from serving.errors import InferenceFailed, ModelNotReady
from serving.inference.backends.channel import ChannelServer
from serving.inference.backends.ray import AppLeases, RayBackend, _bind_replica, _Deployment
from serving.inference.backends.ray_policy import CHANNEL_BATCHES, channel_aware_policy
from serving.inference.batcher import batch_deadline_ns
from tests.helpers.channel_peers import replica_dying_mid_batch
from tests.helpers.polling import until


def test_defaults_and_per_model_override() -> None:
    config = load_config(
        None,
        {
            "backend": "ray",
            "models": {"digits": {"ray": {"num_cpus": 0.5, "autoscaling": {"max_replicas": 4}}}},
        },
    )
    assert config.ray.address is None
    assert config.ray.namespace == "fermion"
    assert config.ray_deployment_for("other").num_cpus == 1.0
    assert config.ray_deployment_for("digits").autoscaling.max_replicas == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ray.deployment.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"ray.deployment.autoscaling": {"initial_replicas": 5}}, "initial_replicas"),
        ({"ray.adress": "auto"}, "ray.adress: unknown key"),
        ({"ray.namespace": "no spaces"}, "ray.namespace"),
    ],
)
def test_bad_ray_settings_are_rejected_with_their_key(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_deployment_shape_follows_the_config(demo_store: ModelStore) -> None:
    config = load_config(
        None,
        {
            "backend": "ray",
            "batching": {"max_concurrent_batches": 3},
            "ray.deployment": {
                "num_cpus": 0.5,
                "memory_mb": 256,
                "health_check_period_s": 0.5,
                "autoscaling": {"min_replicas": 0, "max_replicas": 3, "upscale_delay_s": 1},
            },
        },
    )
    backend = RayBackend(config, demo_store)
    manifest = demo_store.manifest("digits", 1)
    options = backend._deployment_options(manifest, config.ray_deployment_for("digits"))
    assert options["name"] == "digits-v1"
    # One gateway's batches in flight, plus one: never Serve's default of 5.
    assert options["max_ongoing_requests"] == 4
    assert options["health_check_period_s"] == 0.5
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"], actor["memory"]) == (0.5, 0.0, 256 * 1024 * 1024)
    # Batches larger than gRPC's default 4 MB message limit reach the replica.
    limit = actor["runtime_env"]["env_vars"]["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]
    assert int(limit) >= 1024**3
    autoscaling = options["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (0, 3)
    # Scale-to-zero still starts one replica at load, so the version is warm when ready.
    assert autoscaling["initial_replicas"] == 1
    assert autoscaling["upscale_delay_s"] == 1


def test_fixed_replica_count_needs_no_autoscaler(demo_store: ModelStore) -> None:
    config = load_config(
        None, {"ray.deployment": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}}
    )
    options = RayBackend(config, demo_store)._deployment_options(
        demo_store.manifest("digits", 2), config.ray.deployment
    )
    assert options["num_replicas"] == 2
    assert "autoscaling_config" not in options


def test_an_autoscaling_deployment_on_channels_is_sized_by_fermions_policy(
    demo_store: ModelStore,
) -> None:
    autoscaling = {"ray.deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}}
    manifest = demo_store.manifest("digits", 1)
    on = load_config(None, autoscaling)
    options = RayBackend(on, demo_store)._deployment_options(manifest, on.ray.deployment)
    policy = options["autoscaling_config"]["policy"]
    assert policy == {"policy_function": channel_aware_policy}
    off = load_config(None, {**autoscaling, "ray.channel": False})
    options = RayBackend(off, demo_store)._deployment_options(manifest, off.ray.deployment)
    assert "policy" not in options["autoscaling_config"], "Serve's own policy: no channel"


def _build_deployments(options: dict[str, Any], thread: int, errors: list[BaseException]) -> None:
    """Build 30 deployments, as a version loading in a worker thread does; keep errors."""
    for i in range(30):
        try:
            _bind_replica({**options, "name": f"digits-{thread}-{i}"}, "store", "{}")
        except Exception as e:
            errors.append(e)


def test_versions_loading_at_once_build_their_deployments_without_a_race(
    demo_store: ModelStore,
) -> None:
    # A gateway loads its versions concurrently, each building its Serve deployment in a
    # worker thread. Serve pickles the request router and the policy between a global
    # register and unregister of their module: unguarded, about one build in ten of
    # these failed with "... is not registered for pickle by value".
    config = load_config(None, {"ray.deployment": {"autoscaling": {"max_replicas": 2}}})
    manifest = demo_store.manifest("digits", 1)
    options = RayBackend(config, demo_store)._deployment_options(manifest, config.ray.deployment)
    errors: list[BaseException] = []

    threads = [
        threading.Thread(target=_build_deployments, args=(options, n, errors)) for n in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_reading_serves_status_while_a_version_builds_its_deployment_is_no_race(
    demo_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve.status() parses every deployment's details, and a request router config
    # parsed from a dict pickles its class by value too: a gateway counting replicas
    # (or waiting for another version's) while a version builds its deployment made
    # that build fail in CI with "... is not registered for pickle by value".
    from ray import serve
    from ray.serve.schema import DeploymentSchema, ServeStatus

    router = {
        "request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
    }

    def status() -> Any:  # what serve.status() does with the controller's answer
        DeploymentSchema(name="digits", request_router_config=dict(router))
        return ServeStatus()  # (no controller here: no application)

    monkeypatch.setattr(serve, "status", status)
    config = load_config(None, {"ray.deployment": {"autoscaling": {"max_replicas": 2}}})
    backend = RayBackend(config, demo_store)
    manifest = demo_store.manifest("digits", 1)
    options = backend._deployment_options(manifest, config.ray.deployment)
    errors: list[BaseException] = []

    builders = [
        threading.Thread(target=_build_deployments, args=(options, n, errors)) for n in range(2)
    ]

    def count() -> None:  # as long as the builds go on
        while any(b.is_alive() for b in builders):
            try:
                backend._count_replicas()
            except Exception as e:
                errors.append(e)

    counters = [threading.Thread(target=count) for _ in range(4)]
    for t in builders + counters:
        t.start()
    for t in builders + counters:
        t.join()
    assert errors == []


def _context(replicas: int, handles: float, channels: dict[Any, float]) -> Any:
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(min_replicas=0, max_replicas=8, target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=None,  # type: ignore[arg-type]
        deployment_name="digits-v1",
        app_name="fermion.digits.1",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=handles,
        total_queued_requests=0.0,
        aggregated_metrics={CHANNEL_BATCHES: channels} if channels else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_the_policy_counts_handles_requests_and_channels_batches_against_the_target() -> None:
    # Two replicas: one request routed by a handle, 2.5 and 1.5 batches on their channels.
    wanted, _ = channel_aware_policy(_context(2, 1.0, {"r1": 2.5, "r2": 1.5}))
    assert wanted == pytest.approx((1.0 + 2.5 + 1.5) / 2)
    assert channel_aware_policy(_context(2, 3.0, {}))[0] == pytest.approx(1.5), "Serve's own"
    assert channel_aware_policy(_context(2, 0.0, {"r1": 0.0, "r2": 0.0}))[0] == 0.0
    # Scaled to zero, no channel reports: the target stands (Serve starts one on a request).
    assert channel_aware_policy(_context(0, 0.0, {}))[0] == 0


def test_the_policy_pickles_by_value_for_serves_controller() -> None:
    import cloudpickle  # type: ignore[import-untyped]
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    policy_config = AutoscalingPolicy(policy_function=channel_aware_policy)  # type: ignore[no-untyped-call]
    config = AutoscalingConfig(policy=policy_config)

    policy = cloudpickle.loads(config.policy.get_serialized_policy_def())
    assert policy(_context(1, 1.0, {"r1": 3.0}))[0] == pytest.approx(2.0)
    dunder = {"__builtins__", "__name__", "__package__", "__file__"}
    assert set(policy.__globals__) - dunder == {"CHANNEL_BATCHES"}, (
        "nothing of Fermion's but its own constant goes to the controller"
    )


def test_only_the_last_gateway_using_an_application_deletes_it() -> None:
    leases = AppLeases()
    assert leases.take("ns.digits.1", "gw-a") is False
    assert leases.take("ns.digits.1", "gw-b") is False
    assert leases.take("ns.digits.1", "gw-b") is False, "a reload takes no second lease"
    assert leases.holders("ns.digits.1") == ["gw-a", "gw-b"]
    assert leases.give_back("ns.digits.1", "gw-a") is False
    assert leases.give_back("ns.digits.1", "gw-b") is True
    assert leases.holders("ns.digits.1") == []


def test_a_gateway_arriving_during_a_delete_waits_for_it_then_deploys() -> None:
    leases = AppLeases()
    leases.take("app", "gw-a")
    assert leases.give_back("app", "gw-a") is True
    assert leases.take("app", "gw-b") is True, "told that the application is being deleted"
    leases.deleted("app")  # the deleter finishes: gw-b's lease stands
    assert leases.holders("app") == ["gw-b"]
    assert leases.take("app", "gw-c") is False, "gw-b deployed it anew: nothing to wait for"
    assert leases.give_back("other", "gw-a") is True, "an application nobody holds is the caller's"
    leases.deleted("other")
    assert leases.take("other", "gw-a") is False


# -- the retry of a batch whose replica died -------------------------------------------------
# A fake of Ray Serve's DeploymentHandle (the remote boundary) whose calls fail with Ray's
# own exception types; RayBackend itself runs as it does against a cluster.


class _Response:
    """What ``handle.remote()`` returns: awaitable once, cancellable."""

    def __init__(self, outcome: BaseException | dict[str, np.ndarray]) -> None:
        self._outcome = outcome

    def __await__(self) -> Generator[Any, None, dict[str, np.ndarray]]:
        return self._result().__await__()

    async def _result(self) -> dict[str, np.ndarray]:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self) -> None:
        """What the gateway calls on a timeout (unused by these tests)."""


class _ScriptedHandle:
    """Answers each ``remote()`` call with the next outcome of a script."""

    def __init__(self, *outcomes: BaseException | dict[str, np.ndarray]) -> None:
        self._outcomes = list(outcomes)
        self.calls: list[dict[str, np.ndarray]] = []

    def remote(self, inputs: dict[str, np.ndarray], *carrier: dict[str, str]) -> _Response:
        self.calls.append(inputs)
        return _Response(self._outcomes.pop(0))


_INPUTS = {"input": np.zeros((2, 1, 28, 28), np.float32)}
_OUTPUTS = {"logits": np.ones((2, 10), np.float32)}


def _backend_on(handle: _ScriptedHandle, store: ModelStore) -> RayBackend:
    """A RayBackend whose ``digits`` v1 deployment is ``handle``, as ``_connect`` sets it up."""
    from ray.exceptions import RayActorError, RayTaskError

    backend = RayBackend(load_config(None, {"backend": "ray"}), store)
    backend._gone_errors = (RayActorError,)
    backend._task_error = RayTaskError
    fake: Any = handle
    backend._deployments[("digits", 1)] = _Deployment("fermion.digits.1", fake, fake)
    return backend


def _died() -> BaseException:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def _died_in_task() -> BaseException:
    from ray.exceptions import ActorUnavailableError, RayTaskError

    unreachable = ActorUnavailableError("unreachable", b"\0" * 16)
    return RayTaskError("infer", "traceback", unreachable)  # type: ignore[no-untyped-call]


def _unavailable() -> BaseException:
    # What a replica killed mid-batch raises over Serve's gRPC path (seen with a real kill).
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("Actor is unavailable.", b"\0" * 16)


@pytest.mark.parametrize(
    "death",
    [_died, _died_in_task, _unavailable],
    ids=["actor-died", "task-cause", "grpc-unavailable"],
)
def test_a_batch_whose_replica_died_is_retried_once_and_answers(
    demo_store: ModelStore, death: Callable[[], BaseException]
) -> None:
    handle = _ScriptedHandle(death(), _OUTPUTS)
    outputs = asyncio.run(_backend_on(handle, demo_store).infer_batch("digits", 1, _INPUTS))
    assert outputs is _OUTPUTS
    assert len(handle.calls) == 2, "exactly one retry"
    assert all(call is _INPUTS for call in handle.calls), "the same batch, sent again"


def test_a_batch_whose_replicas_die_twice_is_503(demo_store: ModelStore) -> None:
    handle = _ScriptedHandle(_died(), _died(), _OUTPUTS)
    with pytest.raises(ModelNotReady, match="died twice") as raised:
        asyncio.run(_backend_on(handle, demo_store).infer_batch("digits", 1, _INPUTS))
    assert raised.value.status_code == 503
    assert len(handle.calls) == 2, "no second retry"


def test_a_model_error_on_the_replica_is_not_retried(demo_store: ModelStore) -> None:
    from ray.exceptions import RayTaskError

    model_error = RayTaskError("infer", "tb", ValueError("bad rank"))  # type: ignore[no-untyped-call]
    handle = _ScriptedHandle(model_error, _OUTPUTS)
    with pytest.raises(InferenceFailed, match="bad rank") as raised:
        asyncio.run(_backend_on(handle, demo_store).infer_batch("digits", 1, _INPUTS))
    assert raised.value.status_code == 500
    assert len(handle.calls) == 1


@pytest.mark.parametrize(
    "error",
    [ValueError("bad rank"), ModelNotReady("bad rank")],
    ids=["model-error", "fermion-error"],
)
def test_a_replica_error_over_the_grpc_path_is_a_500_and_not_retried(
    demo_store: ModelStore, error: Exception
) -> None:
    # Serve's gRPC data path hands the replica's own exception back, unwrapped; it is a
    # 500, as the same exception wrapped in a RayTaskError is on the task path.
    handle = _ScriptedHandle(error, _OUTPUTS)
    with pytest.raises(InferenceFailed, match="bad rank") as raised:
        asyncio.run(_backend_on(handle, demo_store).infer_batch("digits", 1, _INPUTS))
    assert raised.value.status_code == 500
    assert len(handle.calls) == 1


def test_no_retry_when_the_batch_deadline_leaves_no_time(demo_store: ModelStore) -> None:
    handle = _ScriptedHandle(_died(), _OUTPUTS)
    backend = _backend_on(handle, demo_store)

    async def infer_near_the_deadline() -> dict[str, np.ndarray]:
        # The batch's requests expire 10 ms from now: below the least time worth a retry.
        batch_deadline_ns.set(time.perf_counter_ns() + 10_000_000)
        return await backend.infer_batch("digits", 1, _INPUTS)

    with pytest.raises(ModelNotReady, match="no time was left to retry"):
        asyncio.run(infer_near_the_deadline())
    assert len(handle.calls) == 1


# -- Fermion's channel to the replicas --------------------------------------------------------
# A real ChannelServer on loopback stands for a replica's (backends.channel); the handle is
# the scripted fake above, and AppLeases runs in this process behind ``_LocalActor``.


_T = TypeVar("_T")


class _LocalActor:
    """An object's methods called as a Ray actor's are: ``actor.method.remote(...)``, awaited."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, method: str) -> Any:
        target = getattr(self._target, method)

        class _Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                future = asyncio.get_running_loop().create_future()
                future.set_result(target(*args))
                return future

        return _Method()


def _doubler(
    inputs: dict[str, np.ndarray], carrier: dict[str, str] | None
) -> dict[str, np.ndarray]:
    if "fail" in inputs:
        raise ValueError("bad rank on the replica")
    return {"logits": inputs["input"] * 2}


@pytest.fixture()
def channel_server() -> Generator[ChannelServer, None, None]:
    server = ChannelServer(_doubler, host="127.0.0.1", token="t0ken")
    server.start()
    yield server
    server.close()


def _channel_backend(
    handle: _ScriptedHandle, store: ModelStore, offered: dict[str, str]
) -> tuple[RayBackend, _Deployment]:
    """``_backend_on``, its deployment using channels, ``offered`` (replica: address) in
    the namespace's AppLeases."""
    backend = _backend_on(handle, store)
    deployment = backend._deployments[("digits", 1)]
    deployment.use_channel = True
    deployment.channel_limit = 2
    leases = AppLeases()
    for replica, address in offered.items():
        leases.offer_channel(deployment.app, replica, address, "t0ken")
    backend._leases = _LocalActor(leases)
    return backend, deployment


async def _closed(deployment: _Deployment, result: _T) -> _T:
    """``result``, after the deployment's channels closed (as ``unload`` closes them)."""
    for channel in deployment.channels.values():
        channel.close()
    await asyncio.sleep(0)  # the connections' closes run before the loop ends
    return result


def test_a_batch_goes_over_the_replicas_channel_not_serves_handle(
    demo_store: ModelStore, channel_server: ChannelServer
) -> None:
    handle = _ScriptedHandle()
    backend, deployment = _channel_backend(handle, demo_store, {"r1": channel_server.address})

    async def go() -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        return await _closed(deployment, await backend.infer_batch("digits", 1, _INPUTS))

    outputs = asyncio.run(go())
    np.testing.assert_array_equal(outputs["logits"], _INPUTS["input"] * 2)
    assert handle.calls == []


def test_a_channel_at_its_limit_leaves_the_batch_to_serves_handle(
    demo_store: ModelStore, channel_server: ChannelServer
) -> None:
    handle = _ScriptedHandle(_OUTPUTS)
    backend, deployment = _channel_backend(handle, demo_store, {"r1": channel_server.address})

    async def go() -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        deployment.channels["r1"].in_flight = deployment.channel_limit
        return await _closed(deployment, await backend.infer_batch("digits", 1, _INPUTS))

    assert asyncio.run(go()) is _OUTPUTS
    assert len(handle.calls) == 1


def test_a_batch_whose_replica_dies_on_the_channel_is_retried_once_and_the_channel_dropped(
    demo_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    handle = _ScriptedHandle(_OUTPUTS)

    async def go(address: str) -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        outputs = await backend.infer_batch("digits", 1, _INPUTS)
        assert leases.channels(deployment.app) == {}, "withdrawn for the other gateways"
        # Read before the withdrawal reached the actor: still offered, not reopened.
        leases.offer_channel(deployment.app, "dying", address, "t0ken")
        await backend._refresh_channels(deployment)
        await asyncio.sleep(0)  # the dropped connection's close runs
        return outputs

    with replica_dying_mid_batch() as address:
        backend, deployment = _channel_backend(handle, demo_store, {"dying": address})
        leases: AppLeases = backend._leases._target
        with caplog.at_level("INFO", logger="fermion.backends.ray"):
            assert asyncio.run(go(address)) is _OUTPUTS
    assert len(handle.calls) == 1, "retried once, by Serve's handle"
    assert caplog.text.count("retrying the batch once on another replica") == 1
    assert deployment.channels == {}
    assert deployment.dead == {"dying"}


def test_an_unreachable_channel_is_dropped_and_the_batch_goes_by_the_handle_unretried(
    demo_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens after the block
    handle = _ScriptedHandle(_OUTPUTS)
    backend, deployment = _channel_backend(handle, demo_store, {"gone": address})

    async def go() -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        return await _closed(deployment, await backend.infer_batch("digits", 1, _INPUTS))

    with caplog.at_level("INFO", logger="fermion.backends.ray"):
        assert asyncio.run(go()) is _OUTPUTS
    assert len(handle.calls) == 1
    assert "retrying" not in caplog.text, "nothing had been sent: no retry spent"
    assert "channel to replica gone of fermion.digits.1 dropped" in caplog.text
    assert deployment.channels == {}


def test_a_model_error_over_the_channel_is_a_500_and_not_retried(
    demo_store: ModelStore, channel_server: ChannelServer
) -> None:
    handle = _ScriptedHandle(_OUTPUTS)
    backend, deployment = _channel_backend(handle, demo_store, {"r1": channel_server.address})

    async def go() -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        try:
            return await backend.infer_batch("digits", 1, {**_INPUTS, "fail": np.zeros(1)})
        finally:
            await _closed(deployment, None)

    with pytest.raises(InferenceFailed, match="bad rank on the replica") as raised:
        asyncio.run(go())
    assert raised.value.status_code == 500
    assert handle.calls == []
    assert list(deployment.channels) == ["r1"], "a model error says nothing against the replica"


def test_channels_follow_what_the_replicas_offer_and_withdraw(
    demo_store: ModelStore, channel_server: ChannelServer
) -> None:
    backend, deployment = _channel_backend(
        _ScriptedHandle(), demo_store, {"r1": channel_server.address}
    )
    leases: AppLeases = backend._leases._target

    async def go() -> None:
        await backend._refresh_channels(deployment)
        assert list(deployment.channels) == ["r1"]
        first = deployment.channels["r1"]
        leases.offer_channel(deployment.app, "r2", channel_server.address, "t0ken")
        await backend._refresh_channels(deployment)
        assert sorted(deployment.channels) == ["r1", "r2"]
        assert deployment.channels["r1"] is first, "an open channel is kept"
        leases.withdraw_channel(deployment.app, "r1")  # the replica stopped
        await backend._refresh_channels(deployment)
        assert list(deployment.channels) == ["r2"]
        assert first._closed
        await _closed(deployment, None)

    asyncio.run(go())
    assert leases.give_back(deployment.app, "nobody") is True
    assert leases.channels(deployment.app) == {}, "a deleted application's channels go"


def test_a_batch_a_draining_replica_sends_back_goes_elsewhere_without_a_retry(
    demo_store: ModelStore, channel_server: ChannelServer, caplog: pytest.LogCaptureFixture
) -> None:
    handle = _ScriptedHandle(_OUTPUTS)
    backend, deployment = _channel_backend(handle, demo_store, {"r1": channel_server.address})
    drained: list[bool] = []

    async def go() -> dict[str, np.ndarray]:
        await backend._refresh_channels(deployment)
        await backend.infer_batch("digits", 1, _INPUTS)  # a connection the replica keeps
        draining = asyncio.create_task(
            asyncio.to_thread(
                lambda: drained.append(channel_server.drain(quiet_s=30.0, timeout_s=60.0))
            )
        )
        await until(lambda: channel_server.draining, "the replica draining")
        outputs = await backend.infer_batch("digits", 1, _INPUTS)
        await asyncio.wait_for(draining, 10.0)  # the gateway let go: no quiet_s to wait
        return outputs

    with caplog.at_level("INFO", logger="fermion.backends.ray"):
        assert asyncio.run(go()) is _OUTPUTS
    assert len(handle.calls) == 1, "sent back uncomputed, then carried by Serve's handle"
    assert "retrying" not in caplog.text, "nothing was computed: no retry spent"
    assert "replica r1 is shutting down" in caplog.text
    assert deployment.channels == {}
    assert drained == [True]
