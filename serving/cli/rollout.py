"""``fermion rollout``, ``fermion route`` and ``fermion fleet``: talk to a running gateway's
admin API over HTTP."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from serving.cli._argtypes import duration_seconds

__all__ = ["add_fleet_parser", "add_rollout_parser", "add_route_parser"]

_DEFAULT_URL = "http://127.0.0.1:8000"
#: The environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "FERMION_API_KEY"


def _percent_list(text: str) -> list[float]:
    try:
        return [float(p.strip().rstrip("%")) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percents: {text!r}") from None


def _split(text: str) -> dict[str, float]:
    split: dict[str, float] = {}
    for part in text.split(","):
        version, sep, weight = part.partition("=")
        try:
            if not sep:
                raise ValueError
            split[str(int(version))] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a split: {text!r} (e.g. 1=90,2=10: version=weight, ...)"
            ) from None
    return split


class _AdminError(Exception):
    """The gateway refused (``code`` 2: a 4xx, what was asked is wrong) or failed (1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    url: str = args.url
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} if data is not None else {}
    key = args.api_key or os.environ.get(API_KEY_ENV)
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw).get("error", raw.decode(errors="replace"))
        except ValueError:
            message = raw.decode(errors="replace")
        hint = ""
        if e.code == 401 and not key:
            hint = f" (give the key with --api-key or {API_KEY_ENV})"
        code = 2 if 400 <= e.code < 500 else 1
        raise _AdminError(f"{method} {path}: {e.code} {message}{hint}", code) from None
    except urllib.error.URLError as e:
        raise _AdminError(f"cannot reach the gateway at {url}: {e.reason}") from None


def _figures(f: dict[str, Any]) -> str:
    p99 = f.get("p99_ms")
    return f"{f['requests']} req, {f['error_rate']:.2%} err, p99 " + (
        "-" if p99 is None else f"{p99:.1f} ms"
    )


def _print_state(s: dict[str, Any]) -> None:
    steps = ",".join(f"{p:g}" for p in s["steps"])
    where = (
        "shadow phase" if s["step_index"] < 0 else f"step {s['step_index'] + 1}/{len(s['steps'])}"
    )
    print(
        f"{s['model']}: version {s['baseline']} -> {s['candidate']}  {s['status'].upper()}  "
        f"{where}, candidate at {s['percent']:g}%  (steps {steps}, interval {s['interval_s']:g}s)"
    )
    if s["reason"]:
        print(f"  reason: {s['reason']}")
    for h in s["history"]:
        line = (
            f"  {h['phase']:6} {h['percent']:>5g}%  {h['verdict']:6}  "
            f"candidate {_figures(h['candidate'])}; baseline {_figures(h['baseline'])}"
        )
        if h["verdict"] == "hold":
            line += f"; held: {h['reason']}"
        if h.get("shadow"):
            sh = h["shadow"]
            line += (
                f"; shadow {sh['mirrored']} mirrored, top-1 agreement "
                f"{sh['top1_agreement']}, max abs diff {sh['max_abs_diff']}"
            )
        print(line)


def _run(args: argparse.Namespace, fn: Any) -> int:
    try:
        result = fn(args)
    except _AdminError as e:
        print(f"fermion: {e}", file=sys.stderr)
        return e.code
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _start(args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {
        "to": args.to,
        "steps": args.steps,
        "interval_s": args.interval,
        "shadow_percent": args.shadow_percent,
    }
    if args.baseline is not None:
        body["from"] = args.baseline
    state = _call(args, "POST", f"/admin/rollouts/{args.model}", body)
    if not args.json:
        _print_state(state)
    return state


def _one_or_all(args: argparse.Namespace, kind: str) -> list[Any]:
    """``GET /admin/{kind}/{model}`` when a model is named, else every one of ``kind``."""
    if args.model:
        return [_call(args, "GET", f"/admin/{kind}/{args.model}")]
    listed: list[Any] = _call(args, "GET", f"/admin/{kind}")[kind]
    return listed


def _print_shares(route: dict[str, Any]) -> None:
    shares = ", ".join(f"v{v} {s:.1%}" for v, s in route["shares"].items())
    print(f"{route['model']}: {shares}")


def _status(args: argparse.Namespace) -> Any:
    states = _one_or_all(args, "rollouts")
    if not args.json:
        for state in states:
            _print_state(state)
        if not states:
            print("no rollout has run")
    return states if not args.model else states[0]


def _stop(args: argparse.Namespace) -> Any:
    state = _call(args, "POST", f"/admin/rollouts/{args.model}/stop")
    if not args.json:
        _print_state(state)
    return state


def _route_show(args: argparse.Namespace) -> Any:
    routes = _one_or_all(args, "routes")
    if not args.json:
        for route in routes:
            _print_shares(route)
    return routes


def _route_set(args: argparse.Namespace) -> Any:
    route = _call(args, "PUT", f"/admin/routes/{args.model}/split", {"split": args.split})
    if not args.json:
        _print_shares(route)
    return route


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=_DEFAULT_URL, help=f"gateway URL (default {_DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    p.add_argument(
        "--api-key",
        help=f"API key with the admin scope (default: ${API_KEY_ENV}); sent as a bearer token",
    )


def _runner(fn: Any) -> Any:
    return lambda args: _run(args, fn)


def add_rollout_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rollout start|status|stop`` to the ``fermion`` command line."""
    rollout = sub.add_parser("rollout", help="automatic canary rollouts on a running gateway")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True)
    p = rsub.add_parser("start", help="raise a version's share step by step, with rollback")
    p.add_argument("model")
    p.add_argument("--to", type=int, required=True, help="the candidate version")
    p.add_argument("--from", dest="baseline", type=int, help="the baseline (default: the route's)")
    p.add_argument("--steps", type=_percent_list, default=[1.0, 5.0, 25.0, 50.0, 100.0])
    p.add_argument("--interval", type=duration_seconds, default=60.0, help="per step (60s, 2m)")
    p.add_argument(
        "--shadow-percent", type=float, default=0.0, help="mirror this share first (0: no phase)"
    )
    _common(p)
    p.set_defaults(func=_runner(_start))
    p = rsub.add_parser("status", help="the step, the figures and the verdict")
    p.add_argument("model", nargs="?")
    _common(p)
    p.set_defaults(func=_runner(_status))
    p = rsub.add_parser("stop", help="stop a rollout and roll the candidate back to 0%%")
    p.add_argument("model")
    _common(p)
    p.set_defaults(func=_runner(_stop))


def add_route_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``route show|set`` to the ``fermion`` command line."""
    route = sub.add_parser("route", help="read or change a route's traffic split at run time")
    tsub = route.add_subparsers(dest="route_command", required=True)
    p = tsub.add_parser("show", help="every route, or one, with its shares")
    p.add_argument("model", nargs="?")
    _common(p)
    p.set_defaults(func=_runner(_route_show))
    p = tsub.add_parser("set", help="replace a route's split atomically (persisted)")
    p.add_argument("model")
    p.add_argument("split", type=_split, help="version=weight,... e.g. 1=90,2=10")
    _common(p)
    p.set_defaults(func=_runner(_route_set))


def _fleet_status(args: argparse.Namespace) -> Any:
    fleet = _call(args, "GET", "/admin/fleet")
    if not args.json:
        up = "up" if fleet["store_up"] else "DOWN"
        print(f"control store {fleet['store']} ({up}); {len(fleet['gateways'])} gateway(s)")
        print(
            f"{'gateway':34} {'address':22} {'started':19} {'heartbeat':>9} "
            f"{'routes':>6} {'backend':7} driving"
        )
        for g in fleet["gateways"]:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["started_at"]))
            mark = "*" if g["id"] == fleet["self"] else " "
            print(
                f"{g['id'] + mark:34} {g['address']:22} {started:19} "
                f"{g['heartbeat_age_s']:>8.1f}s {g['route_version']:>6} {g['backend']:7} "
                f"{','.join(g.get('driving', [])) or '-'}"
            )
    return fleet


def add_fleet_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fleet status`` to the ``fermion`` command line."""
    fleet = sub.add_parser("fleet", help="the gateways sharing a control store")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True)
    p = fsub.add_parser("status", help="gateways, heartbeats and applied route versions")
    _common(p)
    p.set_defaults(func=_runner(_fleet_status))
