"""What ``fermion loadtest`` takes and gives: its options, result and error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from loadtest.slo import Slo, SloResult

__all__ = ["EXIT_SLO_MISSED", "LoadTestError", "LoadTestOptions", "LoadTestResult"]

#: The exit status of ``fermion loadtest`` when an SLO was missed.
EXIT_SLO_MISSED: Final = 1


class LoadTestError(RuntimeError):
    """The load test could not run (server unreachable, locust failed, nothing measured)."""


@dataclass
class LoadTestOptions:
    """Everything ``fermion loadtest`` takes."""

    url: str
    model: str
    out: Path
    users: int = 10
    spawn_rate: float = 10.0
    duration_s: float = 60.0
    shape: str = "steady"
    steps: int = 4
    binary: bool = False
    batch_size: int = 1
    model_version: str | None = None
    samples: Path | None = None
    store: Path | None = None
    user_rps: float = 0.0
    api_key_env: str = "FERMION_API_KEY"
    slos: list[Slo] = field(default_factory=list)
    workers: int = 1
    remote_workers: int = 0
    master_bind: str = "127.0.0.1"
    master_port: int | None = None
    #: Every gateway's base URL (``url`` is the first); open loop spreads requests over them.
    urls: list[str] = field(default_factory=list)
    #: Open loop: the arrival rate plan (``2000/s``, steps, ramps); None: locust users.
    rate: str | None = None
    arrival: str = "uniform"
    protocol: str = "http"
    max_connections: int = 1000
    timeout_s: float = 30.0
    #: ``/metrics`` URLs to scrape around the run (None: each gateway's; []: none).
    metrics_urls: list[str] | None = None
    #: Replay this capture (a file or a folder of them) instead of generated requests.
    replay: Path | None = None
    speed: float = 1.0

    @property
    def targets(self) -> list[str]:
        """The gateways' base URLs."""
        return [u.rstrip("/") for u in (self.urls or [self.url])]

    @property
    def mode(self) -> str:
        """``replay``, ``open`` (a rate) or ``closed`` (locust users)."""
        return "replay" if self.replay is not None else "open" if self.rate else "closed"


@dataclass
class LoadTestResult:
    """A finished load test: its summary, SLO verdicts and report folder."""

    summary: dict[str, Any]
    slo_results: list[SloResult]
    out: Path

    @property
    def slo_missed(self) -> list[SloResult]:
        """The objectives that were missed."""
        return [r for r in self.slo_results if not r.ok]
