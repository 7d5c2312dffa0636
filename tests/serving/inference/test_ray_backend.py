"""The ``ray:`` configuration and the Ray Serve deployment it describes (no cluster needed)."""

from __future__ import annotations

import pytest

from model_store.store import ModelStore
from serving.config import ConfigError, load_config
from serving.inference.backends.ray import AppLeases, RayBackend


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
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 0.0,
        "memory": 256 * 1024 * 1024,
    }
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
