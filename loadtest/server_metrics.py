"""The gateway's side of a run: ``/metrics`` scraped before and after, as deltas per version.

Only the documented families are read, by sample name, line by line (a line that does not
parse is skipped, a family that is missing is simply absent):

- ``fermion_queue_duration_seconds`` and ``fermion_compute_duration_seconds`` (histograms
  by model and version): time waiting for a batch vs computing it;
- ``fermion_batch_size`` (histogram of rows per batch);
- ``fermion_rejected_requests_total`` (by model and reason);
- ``fermion_shadow_requests_total`` (by model, primary, shadow and outcome; ``shed``: a
  mirrored copy dropped to protect the primary).

Several gateways (a fleet) are summed. Percentiles are interpolated within histogram
buckets, as Prometheus' ``histogram_quantile`` does; one that falls in the last, open
bucket is reported as "above" its lower bound.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from loadtest.gateway import GatewayError, fetch_text

__all__ = ["FAMILIES", "Snapshot", "breakdown", "histogram_quantile", "parse_samples", "scrape_all"]

QUEUE: Final = "fermion_queue_duration_seconds"
COMPUTE: Final = "fermion_compute_duration_seconds"
BATCH: Final = "fermion_batch_size"
REJECTED: Final = "fermion_rejected_requests_total"
SHADOW: Final = "fermion_shadow_requests_total"
#: The families the breakdown reads.
FAMILIES: Final = (QUEUE, COMPUTE, BATCH, REJECTED, SHADOW)

_QUANTILES: Final = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


def _labels(text: str) -> Labels | None:
    out, pos = [], 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            return None
        value = m[2].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        out.append((m[1], value))
        pos = m.end()
    return tuple(sorted(out))


def parse_samples(text: str, prefixes: Sequence[str] = FAMILIES) -> Samples:
    """Samples of the exposition ``text`` whose names start with one of ``prefixes``."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(tuple(prefixes)):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        labels = _labels(m[2] or "")
        try:
            value = float(m[3])
        except ValueError:
            continue
        if labels is not None and math.isfinite(value):
            samples.setdefault(m[1], {})[labels] = value
    return samples


@dataclass
class Snapshot:
    """One scrape of one gateway (``error`` set when it failed)."""

    url: str
    samples: Samples = field(default_factory=dict)
    error: str | None = None
    at: float = 0.0


def _scrape(url: str, headers: Mapping[str, str]) -> Snapshot:
    try:
        return Snapshot(url, parse_samples(fetch_text(url, headers, timeout_s=10)), at=time.time())
    except GatewayError as e:
        return Snapshot(url, error=str(e), at=time.time())


def scrape_all(urls: Sequence[str], headers: Mapping[str, str] | None = None) -> list[Snapshot]:
    """Every gateway's ``/metrics`` now, in parallel (a failure is kept as its error)."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(len(urls), 16)) as pool:
        return list(pool.map(lambda u: _scrape(u, headers or {}), urls))


def _version_key(labels: Labels) -> tuple[str, str]:
    d = dict(labels)
    return d.get("model", "?"), d.get("version", "?")


def _delta(after: float, before: float | None) -> float:
    # A counter that went down was reset (the gateway restarted): count what it has now.
    return after if before is None or after < before else after - before


@dataclass
class _Hist:
    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0


def _hist_deltas(family: str, before: Samples, after: Samples) -> dict[tuple[str, str], _Hist]:
    out: dict[tuple[str, str], _Hist] = {}
    for suffix in ("_bucket", "_sum", "_count"):
        old = before.get(family + suffix, {})
        for labels, value in after.get(family + suffix, {}).items():
            d = _delta(value, old.get(labels))
            key_labels = tuple(kv for kv in labels if kv[0] != "le")
            h = out.setdefault(_version_key(key_labels), _Hist())
            if suffix == "_bucket":
                le_text = dict(labels).get("le", "+Inf")
                try:
                    le = float(le_text)
                except ValueError:
                    continue
                h.buckets[le] = h.buckets.get(le, 0.0) + d
            elif suffix == "_sum":
                h.total += d
            else:
                h.count += d
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> tuple[float, bool] | None:
    """``(value, above)`` for quantile ``q`` of cumulative ``buckets`` (upper bound ->
    count), interpolated in its bucket; ``above``: it is in the open last bucket, so
    ``value`` is only a lower bound. None without observations."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank and count > prev_count:
            if math.isinf(le):
                return prev_le, True
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count), False
        if not math.isinf(le):
            prev_le = le
        prev_count = count
    return prev_le, True


def _percentiles(h: _Hist, scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": h.total / h.count * scale if h.count else None}
    above = []
    for name, q in _QUANTILES.items():
        got = histogram_quantile(q, h.buckets)
        out[name] = None if got is None else got[0] * scale
        if got is not None and got[1]:
            above.append(name)
    out["above"] = above
    return out


def _batch_buckets(h: _Hist) -> list[dict[str, Any]]:
    rows, prev = [], 0.0
    for le, count in sorted(h.buckets.items()):
        rows.append({"le": None if math.isinf(le) else le, "count": round(count - prev)})
        prev = count
    return rows


def _counter_rows(family: str, before: Samples, after: Samples) -> dict[Labels, float]:
    old = before.get(family, {})
    return {labels: _delta(v, old.get(labels)) for labels, v in after.get(family, {}).items()}


def breakdown(before: Sequence[Snapshot], after: Sequence[Snapshot]) -> dict[str, Any]:
    """What the gateways did between two scrapes of each, summed over the fleet."""
    gateways = []
    queue: dict[tuple[str, str], _Hist] = {}
    compute: dict[tuple[str, str], _Hist] = {}
    batch: dict[tuple[str, str], _Hist] = {}
    rejected: dict[tuple[str, str], float] = {}
    shadow: dict[tuple[str, str, str, str], float] = {}
    old_by_url = {s.url: s for s in before}
    for snap in after:
        old = old_by_url.get(snap.url)
        error = snap.error or (old.error if old is not None else "not scraped before the run")
        gateways.append({"url": snap.url, "ok": error is None, "error": error})
        if error is not None or old is None:
            continue
        for family, into in ((QUEUE, queue), (COMPUTE, compute), (BATCH, batch)):
            for key, h in _hist_deltas(family, old.samples, snap.samples).items():
                mine = into.setdefault(key, _Hist())
                for le, n in h.buckets.items():
                    mine.buckets[le] = mine.buckets.get(le, 0.0) + n
                mine.total += h.total
                mine.count += h.count
        for labels, n in _counter_rows(REJECTED, old.samples, snap.samples).items():
            d = dict(labels)
            k = (d.get("model", "?"), d.get("reason", "?"))
            rejected[k] = rejected.get(k, 0.0) + n
        for labels, n in _counter_rows(SHADOW, old.samples, snap.samples).items():
            d = dict(labels)
            sk = (d.get("model", "?"), d.get("primary", "?"), d.get("shadow", "?"))
            k4 = (*sk, d.get("outcome", "?"))
            shadow[k4] = shadow.get(k4, 0.0) + n
    versions: dict[str, Any] = {}
    for key in sorted(set(queue) | set(compute) | set(batch)):
        q, c, b = queue.get(key, _Hist()), compute.get(key, _Hist()), batch.get(key, _Hist())
        if not (q.count or c.count or b.count):
            continue
        row: dict[str, Any] = {
            "model": key[0],
            "version": key[1],
            "requests": round(q.count),
            "batches": round(c.count or b.count),
            "queue_ms": _percentiles(q, 1000.0),
            "compute_ms": _percentiles(c, 1000.0),
            "batch_size": {**_percentiles(b, 1.0), "buckets": _batch_buckets(b)},
        }
        qp, cp = row["queue_ms"]["p99"], row["compute_ms"]["p99"]
        row["cause"] = None if qp is None or cp is None else "queueing" if qp > cp else "compute"
        versions[f"{key[0]} v{key[1]}"] = row
    return {
        "gateways": gateways,
        "versions": versions,
        "rejected": [
            {"model": m, "reason": r, "count": round(n)}
            for (m, r), n in sorted(rejected.items())
            if n
        ],
        "shadow": [
            {"model": m, "primary": p, "shadow": s, "outcome": o, "count": round(n)}
            for (m, p, s, o), n in sorted(shadow.items())
            if n
        ],
    }
