"""Declarative configuration: one YAML file, validated at start, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model_store.manifest import validate_model_name

__all__ = [
    "BatchingConfig",
    "ConfigError",
    "ExecutorConfig",
    "FermionConfig",
    "LocalBackendConfig",
    "ModelConfig",
    "ServerConfig",
    "StoreConfig",
    "load_config",
]


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    """Where the gateway listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: Largest request body, after gzip decompression (413 above it).
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    #: Log one line per request (uvicorn's access log).
    access_log: bool = False


class StoreConfig(_Strict):
    """The model store the gateway serves from."""

    root: Path = Path("model_store")


class BatchingConfig(_Strict):
    """Dynamic batching per model version."""

    #: Upper bound on rows per batch; also capped by the manifest's max_batch_size.
    max_batch_size: int = Field(default=64, ge=1)
    #: How long a request may wait for others while the executor is idle.
    #: 0 dispatches at once: batching then adds no waiting at low load.
    max_queue_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    #: Requests waiting per model version before new ones get 503.
    max_queue_size: int = Field(default=2048, ge=1)
    #: Batches computed at the same time per model version.
    max_concurrent_batches: int = Field(default=1, ge=1, le=64)


class ExecutorConfig(_Strict):
    """How executors run on this host."""

    #: Threads inside one ONNX Runtime run (intra-op); 0 lets the runtime choose.
    intra_op_threads: int = Field(default=1, ge=0)
    #: Artifact targets in order of preference; the first that fits the host wins.
    prefer: list[str] = Field(default_factory=lambda: ["tensorrt", "torch", "onnxruntime"])


class ModelConfig(_Strict):
    """Per-model settings; anything left out takes the top-level default."""

    #: "all", "latest", or an explicit list of version numbers.
    versions: Literal["all", "latest"] | list[int] = "all"
    batching: BatchingConfig | None = None
    executor: ExecutorConfig | None = None


class LocalBackendConfig(_Strict):
    """Backend ``local``: replicas in the gateway process."""

    #: Worker threads that run inference (the event loop never does).
    inference_threads: int = Field(default=2, ge=1, le=256)


class FermionConfig(_Strict):
    """The whole gateway configuration (``fermion.yaml``)."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    backend: Literal["local", "ray"] = "local"
    local: LocalBackendConfig = Field(default_factory=LocalBackendConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    #: Models to serve. Empty: every model in the store, with the defaults above.
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _check_names(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in models:
            validate_model_name(name)
        return models

    def batching_for(self, model: str) -> BatchingConfig:
        """The batching settings of ``model``."""
        mc = self.models.get(model)
        return mc.batching if mc and mc.batching else self.batching

    def executor_for(self, model: str) -> ExecutorConfig:
        """The executor settings of ``model``."""
        mc = self.models.get(model)
        return mc.executor if mc and mc.executor else self.executor


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> FermionConfig:
    """Read and validate ``path`` (or the defaults), then apply dotted ``overrides``.

    Raises ConfigError with the offending key's path on any problem.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration {path} is not valid YAML: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"configuration {path} must be a mapping at the top level")
        data = raw
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot override {dotted}: {key} is not a mapping")
            node = child
        node[leaf] = value
    try:
        return FermionConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from e
