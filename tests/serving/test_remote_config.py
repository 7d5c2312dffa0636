"""The ``remote`` configuration: three levels of upstream settings, checked at start."""

from __future__ import annotations

from typing import Any

import pytest

from serving.config import ConfigError, FermionConfig, load_config


def _config(**data: Any) -> FermionConfig:
    return FermionConfig.model_validate(data)


def test_each_level_overrides_only_the_keys_it_sets() -> None:
    config = _config(
        backend="remote",
        remote={"urls": ["http://triton:8000/"], "timeout_s": 5, "headers": {"x-key": "k"}},
        models={
            "resnet": {
                "remote": {
                    "model": "resnet_trt",
                    "versions": {2: {"urls": ["https://other:443"], "version": "7"}},
                }
            },
            "bert": {},
        },
    )
    v1 = config.remote_for("resnet", 1)
    assert v1 is not None
    assert (v1.urls, v1.model, v1.version, v1.timeout_s) == (
        ["http://triton:8000"],
        "resnet_trt",
        None,
        5,
    )
    v2 = config.remote_for("resnet", 2)
    assert v2 is not None
    assert (v2.urls, v2.model, v2.version, v2.headers) == (
        ["https://other:443"],
        "resnet_trt",
        "7",
        {"x-key": "k"},
    )
    bert = config.remote_for("bert", 1)
    assert bert is not None and bert.model is None and bert.urls == ["http://triton:8000"]


def test_with_a_local_backend_only_models_with_a_remote_block_use_upstreams() -> None:
    config = _config(
        remote={"urls": ["http://cloud:8000"]},
        models={"edge": {}, "big": {"remote": {"policy": "local-first"}}},
    )
    assert config.remote_for("edge", 1) is None
    big = config.remote_for("big", 1)
    assert big is not None and big.policy == "local-first" and big.urls == ["http://cloud:8000"]
    assert config.uses_remote()
    assert not _config(remote={"urls": ["http://cloud:8000"]}).uses_remote()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"backend": "remote"}, "backend remote serves every model from remote.urls"),
        (
            {"backend": "remote", "models": {"m": {}}},
            "models.m.remote: no upstream URL",
        ),
        (
            {"models": {"m": {"remote": {"versions": {3: {"model": "x"}}}}}},
            "models.m.remote: no upstream URL",
        ),
        (
            {
                "backend": "remote",
                "remote": {"urls": ["http://a:1"]},
                "models": {"m": {"remote": {"policy": "remote-first"}}},
            },
            "policy remote-first needs a local replica",
        ),
        (
            {"backend": "remote", "remote": {"urls": ["grpc://a:1"]}},
            "is not an http:// or https:// URL",
        ),
        (
            {"backend": "remote", "remote": {"urls": ["http://a:1/?x=1"]}},
            "no query or fragment",
        ),
        (
            {"backend": "remote", "remote": {"urls": ["http://a:1", "http://a:1/"]}},
            "listed twice",
        ),
        (
            {"backend": "remote", "remote": {"urls": ["http://a:1"], "remote_percent": 101}},
            "remote_percent",
        ),
        (
            {"backend": "remote", "remote": {"urls": ["http://a:1"], "polcy": "split"}},
            "remote.polcy: unknown key",
        ),
    ],
)
def test_a_remote_configuration_that_cannot_work_is_refused_at_start(
    data: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(None, data)


def test_a_model_may_keep_versions_local_and_declare_others_upstream_only() -> None:
    config = _config(
        models={
            "m": {
                "remote": {
                    "urls": ["http://cloud:8000"],
                    "policy": "local",
                    "versions": {2: {"policy": "remote"}, 3: {"policy": "split"}},
                }
            }
        }
    )
    assert config.remote_for("m", 1) is None
    v2, v3 = config.remote_for("m", 2), config.remote_for("m", 3)
    assert v2 is not None and v2.policy == "remote"
    assert v3 is not None and v3.policy == "split"
    # Only version 2 is served without a local artifact.
    assert config.upstream_versions("m") == [2]
    # The local versions need no URL.
    assert _config(models={"m": {"remote": {"policy": "local"}}}).remote_for("m", 1) is None
