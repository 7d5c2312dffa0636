"""``fermion loadtest capacity``: run the capacity search's probes against real gateways
and write ``capacity.json`` and ``capacity.html`` (rate vs p50/p99, server breakdown)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from loadtest.capacity import (
    CapacityResult,
    ProbeResult,
    generator_kept_up,
    search,
    stop_rule,
)
from loadtest.capacity_report import render_capacity_html
from loadtest.open_runner import run_jobs
from loadtest.options import LoadTestError, LoadTestOptions
from loadtest.preflight import prepare, settings_line
from loadtest.progress import ProgressLine
from loadtest.rates import format_rate
from loadtest.server_metrics import Snapshot, breakdown, scrape_all
from loadtest.slo import Slo, evaluate
from loadtest.summary import number, summarize

__all__ = ["CapacityOptions", "run_capacity"]


@dataclass
class CapacityOptions:
    """The search's bounds, precision and probe lengths, and the SLO it must meet."""

    slos: list[Slo]
    min_rate: float = 1.0
    max_rate: float = 100_000.0
    start_rate: float = 100.0
    precision: float = 0.05
    warmup_s: float = 5.0
    probe_s: float = 20.0


def run_capacity(
    opts: LoadTestOptions,
    copts: CapacityOptions,
    echo: Callable[[str], None] = print,
    progress: Callable[[float], ProgressLine] | None = None,
) -> CapacityResult:
    """Search the capacity of the gateways ``opts`` name; write the report to ``opts.out``."""
    if not copts.slos:
        raise LoadTestError("capacity needs an SLO to meet (--slo)")
    if any(s.metric == "rps" for s in copts.slos):
        raise LoadTestError("capacity finds the rate itself: no rps objective in --slo")
    opts.rate = f"{copts.start_rate}/s"
    opts.duration_s = copts.warmup_s + copts.probe_s
    ready = prepare(opts)
    slo_text = ",".join(s.text for s in copts.slos)
    echo(f"capacity search: {slo_text}; {settings_line(ready.config)}")
    echo(
        f"each probe: {copts.warmup_s:g}s warm-up, then {copts.probe_s:g}s measured; "
        f"precision {copts.precision * 100:g}%"
    )
    rule = stop_rule(copts.slos)

    def probe(rate: float) -> ProbeResult:
        job = replace(
            ready.job,
            rate=f"{rate}/s",
            duration_s=copts.warmup_s + copts.probe_s,
            warmup_s=copts.warmup_s,
            stop=rule,
        )
        before: list[Snapshot] = []
        timers: list[threading.Timer] = []

        def scrape_at_warmup_end(start_at: float) -> None:
            timers.append(
                threading.Timer(
                    max(start_at + copts.warmup_s - time.time(), 0.0),
                    lambda: before.extend(scrape_all(ready.scrape, ready.headers)),
                )
            )
            timers[0].start()

        line = progress(rate) if progress is not None else None
        try:
            result = run_jobs(
                job, opts.workers, opts.out, line.tick if line else None, scrape_at_warmup_end
            )
        except (RuntimeError, OSError, ValueError) as e:
            raise LoadTestError(str(e)) from None
        finally:
            for timer in timers:
                timer.join()
            if line is not None:
                line.close()
        stats = result.stats
        if stats.aborted:
            raise LoadTestError(f"stopped: {stats.aborted}")
        after = scrape_all(ready.scrape, ready.headers)
        summary = summarize(result.measured.to_dict())
        verdicts = evaluate(copts.slos, summary)
        generator = stats.to_dict()
        stopped = stats.unsent > 0
        ok: bool | None
        if not generator_kept_up(generator, rate, stopped):
            ok = None
        else:
            ok = not stopped and all(v.ok for v in verdicts)
        found = ProbeResult(
            rate=rate,
            ok=ok,
            summary=summary,
            generator=generator,
            server=breakdown(before, after) if ready.scrape else None,
            slo=[v.to_dict() for v in verdicts],
            stopped_early=stopped,
        )
        lat = summary.get("latency_ms", {})
        p99 = lat.get("p99")
        echo(
            f"probe {format_rate(rate)}: "
            + {True: "met", False: "MISSED", None: "not judged"}[ok]
            + (f" (p99 {number(p99)}ms" if p99 is not None else " (no answers")
            + f", errors {summary.get('error_rate', 0.0) * 100:.3g}%"
            + (", stopped early)" if stopped else ")")
        )
        return found

    result = search(
        probe,
        start=copts.start_rate,
        min_rate=copts.min_rate,
        max_rate=copts.max_rate,
        precision=copts.precision,
    )
    doc: dict[str, Any] = {
        "kind": "capacity",
        "config": {**ready.config, "rate": None, "duration": None},
        "slo": slo_text,
        "search": {
            "min_rate": copts.min_rate,
            "max_rate": copts.max_rate,
            "start_rate": copts.start_rate,
            "warmup_s": copts.warmup_s,
            "probe_s": copts.probe_s,
        },
        **result.to_dict(),
    }
    (opts.out / "capacity.json").write_text(json.dumps(doc, indent=2))
    (opts.out / "capacity.html").write_text(render_capacity_html(doc))
    return result
