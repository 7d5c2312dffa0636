"""Canary figures merged from every gateway of a fleet, through the control store.

Each gateway publishes, once per sync tick, what its own traffic added to the figures
of every running rollout: per side (baseline, candidate) requests, errors and a fine
latency histogram; per shadow pair the comparisons. The store adds them up; the
rollout's driver reads and resets them once per interval. Figures that could not be
published (the store was down) are kept and sent with the next tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from serving.control.store import ControlStore, StoreUnavailable
from serving.traffic.route_table import RouteTable
from serving.traffic.windows import LatencyFigures, ShadowFigures, latency_bucket

__all__ = [
    "FiguresPublisher",
    "decode_latency",
    "decode_shadow",
    "shadow_key",
    "version_key",
]

_Fields = dict[str, float]


def version_key(model: str, version: int) -> str:
    """The store's name of one version's figures."""
    return f"{model}:v{version}"


def shadow_key(model: str, primary: int, shadow: int) -> str:
    """The store's name of one shadow pair's figures."""
    return f"{model}:s{primary}-{shadow}"


def _encode_latency(f: LatencyFigures) -> _Fields:
    fields: _Fields = {"n": f.requests, "e": f.errors}
    for ms in f.latencies_ms:
        key = f"h{latency_bucket(ms)}"
        fields[key] = fields.get(key, 0) + 1
    return {k: v for k, v in fields.items() if v}


def decode_latency(fields: Mapping[str, float]) -> LatencyFigures:
    """Figures of one version as the store added them up."""
    histogram = tuple(
        (int(k[1:]), int(v)) for k, v in sorted(fields.items()) if k.startswith("h") and v
    )
    return LatencyFigures(int(fields.get("n", 0)), int(fields.get("e", 0)), (), histogram)


def _encode_shadow(f: ShadowFigures) -> _Fields:
    fields: _Fields = {
        "m": f.mirrored,
        "e": f.errors,
        "shed": f.shed,
        "rows": f.rows,
        "agree": f.agree_rows,
        "top1": f.top1_rows,
    }
    fields = {k: v for k, v in fields.items() if v}
    if f.max_abs_diff is not None:
        # The store keeps the largest of "max*" fields; JSON has no infinity.
        fields["max_diff"] = min(f.max_abs_diff, 1e300)
    return fields


def decode_shadow(fields: Mapping[str, float]) -> ShadowFigures:
    """Figures of one shadow pair as the store added them up."""
    diff = fields.get("max_diff")
    return ShadowFigures(
        mirrored=int(fields.get("m", 0)),
        errors=int(fields.get("e", 0)),
        shed=int(fields.get("shed", 0)),
        rows=int(fields.get("rows", 0)),
        agree_rows=int(fields.get("agree", 0)),
        top1_rows=int(fields.get("top1", 0)),
        max_abs_diff=None if diff is None else (float("inf") if diff >= 1e300 else diff),
    )


def _add(into: dict[str, _Fields], name: str, fields: _Fields) -> None:
    if not fields:
        return
    have = into.setdefault(name, {})
    for k, v in fields.items():
        have[k] = max(have.get(k, v), v) if k.startswith("max") else have.get(k, 0) + v


class FiguresPublisher:
    """Sends this gateway's share of every running rollout's figures to the store."""

    def __init__(self, routes: RouteTable, store: ControlStore) -> None:
        self._routes = routes
        self._store = store
        self._pending: dict[str, _Fields] = {}
        self._watched: set[tuple[str, int, int]] = set()

    async def publish(self, rollouts: Iterable[tuple[str, int, int]]) -> None:
        """Publish the figures of (model, baseline, candidate) since the last call.

        A rollout seen for the first time starts from now: what came before is dropped.
        """
        watched = set(rollouts)
        for model, baseline, candidate in watched:
            fresh = (model, baseline, candidate) not in self._watched
            base = self._routes.window(model, baseline).take()
            cand = self._routes.window(model, candidate).take()
            shadow = self._routes.shadow.window(model, baseline, candidate).take()
            if fresh:
                continue
            _add(self._pending, version_key(model, baseline), _encode_latency(base))
            _add(self._pending, version_key(model, candidate), _encode_latency(cand))
            _add(self._pending, shadow_key(model, baseline, candidate), _encode_shadow(shadow))
        self._watched = watched
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await self._store.add_figures(pending)
        except StoreUnavailable:
            for name, fields in pending.items():  # sent with the next tick instead
                _add(self._pending, name, fields)
            raise
