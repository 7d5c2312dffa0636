"""The ``fermion`` command line: a table of commands, each imported only when chosen.

Every command lives in its own module, which adds its subcommand to the parser
(``add_<name>_parser(subparsers)``). Only the chosen command's module is imported;
the others appear in ``fermion --help`` by their one-line help alone.

Exit codes, the same for every command: 0 done; 1 the operation ran and failed (a
gateway that cannot be reached or answers 5xx, a missed load-test SLO); 2 what was
asked is wrong or does not exist (bad arguments, an invalid configuration, a missing
store, model, version or key, a gateway's 4xx answer, nothing to serve); 3 the gateway
could not start (e.g. its port is taken); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from model_store.store import StoreError
from serving.config import ConfigError
from serving.protocol import SERVER_VERSION

__all__ = ["COMMANDS", "Command", "main"]


class Command(NamedTuple):
    """Where a command's parser comes from, its help, and the extra it needs (if any)."""

    #: ``"module:function"``; the function adds the subcommand to the subparsers.
    register: str
    help: str
    #: The ``fermion[...]`` extra the command needs, or None when serving has all of it.
    extra: str | None = None


#: Command name -> its module; ``fermion --help`` lists them in this order.
COMMANDS: dict[str, Command] = {
    "serve": Command(
        "serving.cli.serve:add_serve_parser", "run the gateway (KServe V2 over HTTP and gRPC)"
    ),
    "models": Command(
        "serving.cli.models:add_models_parser", "list, show, push and remove published models"
    ),
    "rollout": Command(
        "serving.cli.rollout:add_rollout_parser", "automatic canary rollouts on a running gateway"
    ),
    "route": Command(
        "serving.cli.rollout:add_route_parser",
        "read or change a route's traffic split at run time",
    ),
    "fleet": Command(
        "serving.cli.rollout:add_fleet_parser", "the gateways sharing a control store"
    ),
    "keys": Command("serving.cli.keys:add_keys_parser", "create, list and revoke API keys"),
    "build": Command(
        "compilers.cli:add_build_parser",
        "build a model (compile extra); see fermion build -h",
        "compile",
    ),
    "demo": Command(
        "compilers.cli:add_demo_parser",
        "demo a model (compile extra); see fermion demo -h",
        "compile",
    ),
    "loadtest": Command(
        "loadtest.cli:add_loadtest_parser",
        "load-test a gateway (loadtest extra); see fermion loadtest -h",
        "loadtest",
    ),
}

_Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _load(spec: str) -> _Register:
    module_name, _, attr = spec.partition(":")
    register: _Register = getattr(importlib.import_module(module_name), attr)
    return register


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s subcommand in full and every other one as a placeholder."""
    parser = argparse.ArgumentParser(prog="fermion", description="Fermion model-serving gateway")
    parser.add_argument("--version", action="version", version=f"fermion {SERVER_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=entry.help)
            continue
        try:
            register = _load(entry.register)
        except ImportError as e:
            if entry.extra is None:
                raise
            stub = sub.add_parser(name, help=f"(needs the {entry.extra} extra: {e.name} missing)")
            stub.set_defaults(func=_missing_extra(name, entry.extra, str(e)))
            continue
        register(sub)
    return parser


def _missing_extra(command: str, extra: str, error: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(
            f"fermion {command} needs the {extra} extra (pip install 'fermion[{extra}]'): {error}",
            file=sys.stderr,
        )
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fermion``; the only place that exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(command).parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, StoreError, ValueError) as e:
        print(f"fermion: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
