"""Run wrk with the body script and read back its one-line JSON result."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench._payloads import Payload

__all__ = ["WrkResult", "find_wrk", "run_wrk"]

_SCRIPT = Path(__file__).with_name("wrk_body.lua")
_MARKER = "WRK_RESULT "


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured, plus the CPU time wrk itself used."""

    requests: int
    duration_s: float
    errors: dict[str, int]
    #: wrk's own statistics (after its coordinated-omission correction), in µs.
    latency_us: dict[str, float]
    cpu_s: float

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_share(self) -> float:
        """wrk's CPU time over wall time: 1.0 is one core kept busy."""
        return self.cpu_s / self.duration_s if self.duration_s else 0.0

    def ms(self, key: str) -> float:
        """A latency statistic (``p50``, ``p99``, ``max``...) in milliseconds."""
        return self.latency_us[key] / 1000.0


def find_wrk() -> str:
    """The path of the wrk binary; ``bench/run.sh`` installs it when missing."""
    path = shutil.which("wrk")
    if path is None:
        raise FileNotFoundError(
            "wrk is not installed: run `bash bench/run.sh` (apt-get install wrk)"
        )
    return path


def run_wrk(
    wrk: str,
    url: str,
    payload: Payload,
    body_file: Path,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    timeout_s: int = 10,
    headers: dict[str, str] | None = None,
    nice: int | None = None,
) -> WrkResult:
    """Drive ``url`` with ``payload`` on ``connections`` keep-alive connections for a while.

    ``headers``: more request headers (an API key, say). ``nice``: run wrk at that
    niceness (below 0, ahead of the servers it measures, needs the privilege to).
    """
    env = dict(
        os.environ,
        WRK_BODY_FILE=str(body_file),
        WRK_CONTENT_TYPE=payload.content_type,
        WRK_EXTRA_HEADERS="".join(f"{k}: {v}\n" for k, v in (headers or {}).items()),
    )
    if payload.header_length is not None:
        env["WRK_INFERENCE_HEADER_LENGTH"] = str(payload.header_length)
    argv = [
        *(["nice", "-n", str(nice)] if nice is not None else []),
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(_SCRIPT),
        url,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next((s for s in done.stdout.splitlines() if s.startswith(_MARKER)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    data = json.loads(line[len(_MARKER) :])
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        errors={k: int(v) for k, v in data["errors"].items()},
        latency_us={k: float(v) for k, v in data["latency_us"].items()},
        cpu_s=cpu,
    )
