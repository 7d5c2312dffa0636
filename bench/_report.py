"""The results table, the checks against the issue's targets, and the JSON record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench._wrk import WrkResult

__all__ = [
    "Cell",
    "Check",
    "compare",
    "evaluate",
    "format_cells",
    "format_checks",
    "format_comparison",
]

MIB = 1024 * 1024
#: The issue's targets on the 2-core machine.
RPS_RATIO_MIN = 1.5
P99_RATIO_MAX = 0.5
P50_DELTA_MAX_MS = 0.3
BINARY_RATIO_MIN = 1.5
IDLE_RSS_MAX_MIB = 150.0
#: Validity of a run: wrk must leave the server its cores, and nothing else may run.
WRK_CPU_MAX = 0.5
OTHER_CPU_MAX = 0.25
#: ...and the hypervisor may not take more than this from the VM (steal) during a cell.
STEAL_MAX = 0.10


@dataclass
class Cell:
    """One server x body x concurrency measurement."""

    server: str
    body: str
    concurrency: int
    result: WrkResult | None = None
    #: CPU used during the run, in cores (1.0 = one core busy): server tree, and whole machine.
    server_cpu: float = 0.0
    machine_busy: float = 0.0
    #: Of ``machine_busy``: interrupt work (loopback networking) and hypervisor steal.
    interrupts: float = 0.0
    steal: float = 0.0
    #: TCP segments retransmitted machine-wide during the run (each a >= 200 ms stall).
    tcp_retransmits: int = 0
    #: The busiest other processes during the run, e.g. ``"pytest[812] 85%"``.
    other_top: list[str] = field(default_factory=list)
    #: How many times the cell was measured (more than once when the machine was busy).
    attempts: int = 1
    error: str | None = None
    #: When the measured run began and ended (``time.monotonic``), where recorded.
    started: float = 0.0
    ended: float = 0.0
    #: A sleeping process's p99 lateness meanwhile, in ms, and its wake-ups over 1 ms
    #: late (``bench/_host_lateness.py``), where measured.
    host_late_p99_ms: float | None = None
    host_late_wakeups: int | None = None

    @property
    def other_cpu(self) -> float:
        """Cores used during the run by processes other than the server and wrk (noise)."""
        wrk = self.result.cpu_share if self.result is not None else 0.0
        own = self.server_cpu + wrk + self.interrupts + self.steal
        return max(0.0, self.machine_busy - own)

    @property
    def noisy(self) -> bool:
        """Other processes or other guests (steal) took enough CPU to distort the cell."""
        return self.other_cpu > OTHER_CPU_MAX or self.steal > STEAL_MAX

    @property
    def noise(self) -> float:
        """Cores taken from the cell by anything outside it: to pick the cleanest attempt."""
        return self.other_cpu + self.steal

    @property
    def label(self) -> str:
        """``server-body``, e.g. ``fermion-binary``."""
        return f"{self.server}-{self.body}"

    def record(self, bare: Cell | None) -> dict[str, Any]:
        """This cell as a JSON-ready dict, with its ratios to ``bare``."""
        out: dict[str, Any] = {
            "server": self.server,
            "body": self.body,
            "concurrency": self.concurrency,
            "attempts": self.attempts,
            "error": self.error,
        }
        r = self.result
        if r is not None:
            out |= {
                "requests": r.requests,
                "duration_s": round(r.duration_s, 3),
                "rps": round(r.rps, 1),
                "latency_ms": {k: round(v / 1000, 4) for k, v in r.latency_us.items()},
                "errors": r.errors,
                "wrk_cpu_cores": round(r.cpu_share, 3),
                "server_cpu_cores": round(self.server_cpu, 3),
                "machine_busy_cores": round(self.machine_busy, 3),
                "interrupt_cores": round(self.interrupts, 3),
                "steal_cores": round(self.steal, 3),
                "other_cpu_cores": round(self.other_cpu, 3),
                "tcp_retransmits": self.tcp_retransmits,
                "other_processes": self.other_top,
            }
            if self.host_late_p99_ms is not None:
                out["host_late_p99_ms"] = round(self.host_late_p99_ms, 3)
                out["host_late_wakeups"] = self.host_late_wakeups
            b = bare.result if bare is not None else None
            if b is not None:
                out["rps_vs_bare"] = round(r.rps / b.rps, 3)
                out["p99_vs_bare"] = round(r.latency_us["p99"] / b.latency_us["p99"], 3)
        return out


@dataclass
class Check:
    """One target: PASS, MISS (with by how much) or N/A when it could not be measured."""

    name: str
    status: str
    measured: str
    detail: str = ""

    def record(self) -> dict[str, str]:
        """This check as a JSON-ready dict."""
        return {
            "name": self.name,
            "status": self.status,
            "measured": self.measured,
            "detail": self.detail,
        }


@dataclass
class _Index:
    cells: list[Cell]
    by_key: dict[tuple[str, int], WrkResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.cells:
            if c.result is not None:
                self.by_key[(c.label, c.concurrency)] = c.result

    def get(self, label: str, concurrency: int) -> WrkResult | None:
        return self.by_key.get((label, concurrency))


def _at_least(name: str, value: float | None, floor: float, unit: str = "x") -> Check:
    if value is None:
        return Check(name, "N/A", "-", "not measured")
    shown = f"{value:.2f}{unit}"
    if value >= floor:
        return Check(name, "PASS", shown, f"{value - floor:+.2f}{unit} over the target")
    return Check(name, "MISS", shown, f"short by {floor - value:.2f}{unit}")


def _at_most(name: str, value: float | None, ceiling: float, unit: str = "x") -> Check:
    if value is None:
        return Check(name, "N/A", "-", "not measured")
    shown = f"{value:.2f}{unit}"
    if value <= ceiling:
        return Check(name, "PASS", shown, f"{ceiling - value:.2f}{unit} under the target")
    return Check(name, "MISS", shown, f"over by {value - ceiling:.2f}{unit}")


def _worst_cell(cells: list[Cell], cores: Callable[[Cell], float], name: str, most: float) -> Check:
    """``cores`` of the worst cell against a ceiling, in % of a core, naming that cell."""
    worst = max(cells, key=cores)
    check = _at_most(name, cores(worst) * 100, most * 100, "%")
    check.detail += f" (worst cell: {worst.label} c={worst.concurrency})"
    return check


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _rps(r: WrkResult | None) -> float | None:
    return None if r is None else r.rps


def _p99(r: WrkResult | None) -> float | None:
    return None if r is None else r.latency_us["p99"]


def evaluate(
    cells: list[Cell],
    low: int,
    high: int,
    idle_rss: int | None,
    torch_files: list[str] | None,
    answer_errors: dict[str, str],
) -> list[Check]:
    """Check the measured cells against every target of the issue."""
    idx = _Index(cells)
    checks: list[Check] = []
    bare_hi, bare_lo = idx.get("bare-json", high), idx.get("bare-json", low)
    for body in ("json", "binary"):
        f_hi, f_lo = idx.get(f"fermion-{body}", high), idx.get(f"fermion-{body}", low)
        checks.append(
            _at_least(
                f"c={high} fermion-{body} req/s >= {RPS_RATIO_MIN}x bare",
                _ratio(_rps(f_hi), _rps(bare_hi)),
                RPS_RATIO_MIN,
            )
        )
        checks.append(
            _at_most(
                f"c={high} fermion-{body} p99 <= {P99_RATIO_MAX}x bare p99",
                _ratio(_p99(f_hi), _p99(bare_hi)),
                P99_RATIO_MAX,
            )
        )
        delta = None if f_lo is None or bare_lo is None else f_lo.ms("p50") - bare_lo.ms("p50")
        checks.append(
            _at_most(
                f"c={low} fermion-{body} p50 within {P50_DELTA_MAX_MS} ms of bare",
                delta,
                P50_DELTA_MAX_MS,
                " ms",
            )
        )
    for conc in (high, low):
        j, b = idx.get("fermion-json", conc), idx.get("fermion-binary", conc)
        checks.append(
            _at_least(
                f"c={conc} fermion binary req/s >= {BINARY_RATIO_MIN}x json",
                _ratio(_rps(b), _rps(j)),
                BINARY_RATIO_MIN,
            )
        )
    checks.append(
        _at_most(
            f"idle RSS of fermion serve <= {IDLE_RSS_MAX_MIB:.0f} MiB",
            None if idle_rss is None else idle_rss / MIB,
            IDLE_RSS_MAX_MIB,
            " MiB",
        )
    )
    if torch_files is None:
        checks.append(Check("fermion serve does not load torch", "N/A", "-", "not measured"))
    else:
        checks.append(
            Check(
                "fermion serve does not load torch",
                "MISS" if torch_files else "PASS",
                "loaded" if torch_files else "not loaded",
                ", ".join(torch_files[:3]),
            )
        )
    bad_answers = {k: v for k, v in answer_errors.items() if v}
    checks.append(
        Check(
            "answers correct before load (argmax = expected class)",
            "MISS" if bad_answers else "PASS",
            f"{len(answer_errors) - len(bad_answers)}/{len(answer_errors)}",
            "; ".join(f"{k}: {v}" for k, v in bad_answers.items()),
        )
    )
    not_run = [f"{c.label} c={c.concurrency}: {c.error}" for c in cells if c.result is None]
    checks.append(
        Check(
            "every cell ran",
            "MISS" if not_run else "PASS",
            f"{len(cells) - len(not_run)}/{len(cells)}",
            "; ".join(not_run),
        )
    )
    ran = [c for c in cells if c.result is not None]
    failed = [
        f"{c.label} c={c.concurrency}: {c.result.errors}"
        for c in ran
        if c.result is not None and any(c.result.errors.values())
    ]
    if ran:
        busiest = max(ran, key=lambda c: c.result.cpu_share if c.result else 0.0)
        share = busiest.result.cpu_share if busiest.result else 0.0
        checks.append(
            _at_most(
                f"load generator not the bottleneck: wrk CPU <= {WRK_CPU_MAX:.0%} of a core",
                share * 100,
                WRK_CPU_MAX * 100,
                "%",
            )
        )
        checks.append(
            _worst_cell(
                ran,
                lambda c: c.other_cpu,
                f"machine quiet: other processes <= {OTHER_CPU_MAX:.0%} of a core per cell",
                OTHER_CPU_MAX,
            )
        )
        checks.append(
            _worst_cell(
                ran,
                lambda c: c.steal,
                f"VM quiet: hypervisor steal <= {STEAL_MAX:.0%} of a core per cell",
                STEAL_MAX,
            )
        )
    checks.append(
        Check(
            "wrk saw zero errors and zero non-2xx",
            "MISS" if failed else ("PASS" if ran else "N/A"),
            f"{len(ran) - len(failed)}/{len(ran)} cells clean",
            "; ".join(failed),
        )
    )
    return checks


def compare(cells: list[Cell], against: str) -> list[dict[str, Any]]:
    """Each Fermion cell against the ``against`` cell (e.g. ``kserve-json``) at its concurrency."""
    idx = _Index(cells)
    rows = []
    for c in cells:
        other = idx.get(against, c.concurrency)
        if c.server != "fermion" or c.result is None or other is None:
            continue
        r = c.result
        rows.append(
            {
                "concurrency": c.concurrency,
                "fermion": c.label,
                "against": against,
                "rps_ratio": round(r.rps / other.rps, 3),
                "p50_ratio": round(r.latency_us["p50"] / other.latency_us["p50"], 3),
                "p99_ratio": round(r.latency_us["p99"] / other.latency_us["p99"], 3),
            }
        )
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """Ratios of Fermion to one competitor: req/s higher is better, latencies lower."""
    if not rows:
        return ""
    head = f"{'fermion':<15} {'vs':<12} {'conc':>4} {'req/s':>7} {'p50':>7} {'p99':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['fermion']:<15} {row['against']:<12} {row['concurrency']:>4} "
            f"{row['rps_ratio']:>6.2f}x {row['p50_ratio']:>6.2f}x {row['p99_ratio']:>6.2f}x"
        )
    return "\n".join(lines)


def format_cells(cells: list[Cell]) -> str:
    """The side-by-side table: one row per cell, ratios to bare-json at the same concurrency."""
    idx = _Index(cells)
    head = (
        f"{'server':<8} {'body':<7} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s/bare':>10} {'p99/bare':>8} {'srv CPU':>7} {'wrk CPU':>7} {'other':>5} "
        f"{'irq':>4} {'steal':>5} {'retx':>5} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        r = c.result
        if r is None:
            lines.append(f"{c.server:<8} {c.body:<7} {c.concurrency:>4}  not run: {c.error}")
            continue
        bare = idx.get("bare-json", c.concurrency)
        rps_ratio = f"{r.rps / bare.rps:.2f}x" if bare else "-"
        p99_ratio = f"{r.latency_us['p99'] / bare.latency_us['p99']:.2f}x" if bare else "-"
        lines.append(
            f"{c.server:<8} {c.body:<7} {c.concurrency:>4} {r.rps:>8.0f} {r.ms('p50'):>8.3f} "
            f"{r.ms('p99'):>8.3f} {rps_ratio:>10} {p99_ratio:>8} {c.server_cpu:>6.0%} "
            f"{r.cpu_share:>6.0%} {c.other_cpu:>5.0%}{'!' if c.other_cpu > OTHER_CPU_MAX else ' '}"
            f"{c.interrupts:>4.0%} {c.steal:>5.0%}{'!' if c.steal > STEAL_MAX else ' '}"
            f"{c.tcp_retransmits:>4} "
            f"{sum(r.errors.values()):>6}"
        )
    lines += [
        "p50/p99: wrk's own percentiles (with its coordinated-omission correction). CPU: share",
        "  of one core used during the cell by the server (with children), by wrk, and by",
        f"  other processes (noise; '!' marks a cell over {OTHER_CPU_MAX:.0%}); irq: interrupt",
        "  work on no process's account (mostly loopback TCP); steal: CPU the hypervisor gave",
        f"  to other guests (noise from outside the VM; '!' over {STEAL_MAX:.0%}). retx: TCP",
        "  retransmits on the whole machine during the cell (on loopback each is a stall of",
        "  at least 200 ms: where nonzero they shape p99).",
    ]
    lines += [
        f"  ! {c.label} c={c.concurrency}: {', '.join(c.other_top) or 'short-lived processes'}"
        for c in cells
        if c.result is not None and c.other_cpu > OTHER_CPU_MAX
    ]
    return "\n".join(lines)


def format_checks(checks: list[Check]) -> str:
    """One line per target: status, what was measured, and by how much."""
    width = max(len(c.name) for c in checks)
    return "\n".join(
        f"{c.status:<4}  {c.name:<{width}}  {c.measured:>11}  {c.detail}" for c in checks
    )
