"""Before any load: check the gateway, the model and one request of the test, and write
down every setting that shapes the result (the report's header)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from loadtest.gateway import GatewayError, auth_headers
from loadtest.open_runner import EngineJob, check_request
from loadtest.options import LoadTestError, LoadTestOptions
from loadtest.payloads import find_samples
from loadtest.rates import parse_rate
from loadtest.transport import Outcome

__all__ = [
    "RAW_FILE",
    "Prepared",
    "check_model_request",
    "engine_job",
    "metrics_urls",
    "prepare",
    "settings",
    "settings_line",
]

#: The per-second measurements of a run, in its report folder.
RAW_FILE: Final = "raw.json"
#: Answers that refuse the request itself (a busy server's 429/503 are results, not these).
_REFUSED: Final = frozenset({400, 401, 403, 404, 405, 411, 413, 415, 422})


def _require_locust() -> None:
    if importlib.util.find_spec("locust") is None:
        raise LoadTestError("locust is missing: pip install 'fermion[loadtest]'")


def _samples(opts: LoadTestOptions) -> Path | None:
    if opts.samples is not None:
        if not opts.samples.is_file():
            raise LoadTestError(f"samples file {opts.samples} not found")
        return opts.samples
    if opts.store is not None:
        version = int(opts.model_version) if opts.model_version else None
        return find_samples(opts.store, opts.model, version)
    return None


def engine_job(opts: LoadTestOptions, samples: Path | None) -> EngineJob:
    """The open-loop engine's job for ``opts`` (also used for the request check)."""
    return EngineJob(
        targets=opts.targets,
        model=opts.model,
        model_version=opts.model_version,
        protocol=opts.protocol,
        binary=opts.binary,
        batch_size=opts.batch_size,
        samples=str(samples.resolve()) if samples else None,
        api_key_env=opts.api_key_env,
        max_connections=opts.max_connections,
        timeout_s=opts.timeout_s,
        rate=opts.rate,
        duration_s=opts.duration_s,
        arrival=opts.arrival,
        replay=str(opts.replay.resolve()) if opts.replay else None,
        speed=opts.speed,
    )


def check_model_request(job: EngineJob) -> Outcome:
    """Send one request of the test before the load: one the model refuses (a batch over
    its maximum, a wrong input) ends the test now, with the server's message. Returns
    what came back (the report records it: the gateways counted this request too)."""
    outcome = check_request(job)
    if outcome.status == 0:
        raise LoadTestError(f"the test's first request got no answer: {outcome.error}")
    if outcome.status in _REFUSED:
        raise LoadTestError(
            f"the gateway refuses the test's requests, so every request would fail: {outcome.error}"
        )
    return outcome


def settings(opts: LoadTestOptions, samples: Path | None) -> dict[str, Any]:
    """Every setting that shapes the result, as the report's header records it."""
    mode = opts.mode
    config: dict[str, Any] = {
        "mode": {"open": "open loop", "closed": "closed loop (locust)", "replay": "replay"}[mode],
        "url": opts.url,
        "urls": opts.targets,
        "protocol": opts.protocol,
        "api_key": f"${opts.api_key_env}" if os.environ.get(opts.api_key_env) else "none",
        "workers": opts.workers + opts.remote_workers
        if opts.workers > 1 or opts.remote_workers
        else 0,
    }
    if mode == "replay":
        config.update(replay=str(opts.replay), speed=opts.speed, timeout=f"{opts.timeout_s:g}s")
        config.update(max_connections=opts.max_connections)
        return config
    config.update(
        model=opts.model,
        model_version=opts.model_version,
        route=f"version {opts.model_version}" if opts.model_version else "routed by the gateway",
        encoding="raw" if opts.protocol == "grpc" else "binary" if opts.binary else "json",
        binary=opts.binary,
        batch_size=opts.batch_size,
        samples=str(samples) if samples else None,
        inputs="samples" if samples else "random within the signature",
        duration=f"{opts.duration_s:g}s",
    )
    if mode == "open":
        assert opts.rate is not None
        config.update(
            rate=parse_rate(opts.rate, opts.duration_s).describe(),
            arrival=opts.arrival,
            max_connections=opts.max_connections,
            timeout=f"{opts.timeout_s:g}s",
        )
    else:
        config.update(
            users=opts.users,
            spawn_rate=opts.spawn_rate,
            shape=opts.shape,
            user_rps=opts.user_rps or "no pause (back to back)",
        )
        if opts.shape == "step":
            config["steps"] = opts.steps
    return config


def settings_line(config: Mapping[str, Any]) -> str:
    """The settings on one line (``key=value`` for those that are set)."""
    skip = {"url", "binary", "samples"}
    return " ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in config.items()
        if k not in skip and v not in (None, "", 0, False)
    )


def metrics_urls(opts: LoadTestOptions) -> list[str]:
    """The ``/metrics`` URLs to scrape around the run (by default each gateway's; none
    for gRPC addresses, whose HTTP port only ``--metrics-url`` can name)."""
    if opts.metrics_urls is not None:
        return opts.metrics_urls
    if opts.protocol != "http":
        return []
    return [f"{u}/metrics" for u in opts.targets]


@dataclass
class Prepared:
    """A test checked and ready to run: its samples, engine job, settings, scrape list."""

    samples: Path | None
    job: EngineJob
    config: dict[str, Any]
    headers: dict[str, str]
    scrape: list[str]
    check: Outcome | None = None


def prepare(opts: LoadTestOptions) -> Prepared:
    """Check the gateway, the model and one request of the test before any load.

    Creates the report folder. LoadTestError says what is wrong (unreachable gateway,
    unknown model, a request the model refuses, a bad samples file).
    """
    mode = opts.mode
    if mode == "closed":
        _require_locust()
        if len(opts.targets) > 1:
            raise LoadTestError("several --url need an open-loop run (--rate)")
    if opts.remote_workers and mode != "closed":
        raise LoadTestError("--remote-workers is for locust runs (without --rate)")
    headers = auth_headers(opts.api_key_env)
    samples = None
    if mode != "replay":
        samples = _samples(opts)
    job = engine_job(opts, samples)
    check = None
    if mode != "replay":
        try:
            check = check_model_request(job)
        except (GatewayError, ValueError) as e:
            raise LoadTestError(str(e)) from None
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / RAW_FILE).unlink(missing_ok=True)
    return Prepared(samples, job, settings(opts, samples), headers, metrics_urls(opts), check)
