"""The ``fermion`` command line: serve, models, and (with the compile extra) build and demo."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model_store.store import ModelStore, StoreError
from serving.cli.keys import add_keys_parser
from serving.cli.rollout import add_rollout_parsers
from serving.config import ConfigError, load_config

__all__ = ["main"]

#: Commands that live on the compile side, imported only when used.
_COMPILE_COMMANDS: dict[str, str] = {
    "build": "compilers.cli:add_build_parser",
    "demo": "compilers.cli:add_demo_parser",
}


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.cli.banner import usage_text
    from serving.http.app import create_app
    from serving.inference.repository import ModelRepository

    overrides: dict[str, Any] = {}
    if args.store is not None:
        overrides["store.root"] = str(args.store)
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.keys_file is not None:
        overrides["auth.keys_file"] = str(args.keys_file)
    config = load_config(args.config, overrides)
    demo_key = _demo_key(args.demo_key, config.auth.keys_file) if args.demo_key else None
    if config.server.access_log:
        from serving.http.middleware.access_log import configure_access_logger

        configure_access_logger()
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    base_url = f"http://{config.server.host}:{config.server.port}"

    def on_ready(repo: ModelRepository) -> None:
        names = repo.configured_models()
        if not names:
            print(f"Fermion is up at {base_url} with no models in {config.store.root}", flush=True)
            return
        name = names[0]
        try:
            versions = repo.versions(name)
        except Exception:
            return
        manifest = versions[max(versions)].manifest
        print(usage_text(repo.store, manifest, base_url, api_key=demo_key), flush=True)

    app = create_app(config, on_ready=on_ready, config_path=args.config)
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=config.server.log_level,
        access_log=False,  # server.access_log writes Fermion's own JSON lines instead
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
    )
    return 0


def _demo_key(name: str, keys_file: Path | None) -> str:
    from serving.auth import create_key

    if keys_file is None:
        raise ConfigError("--demo-key needs a keys file (--keys-file or auth.keys_file)")
    return create_key(keys_file, name, ["infer:*", "read"], replace=True)


def _models_list(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    rows = []
    for name in store.models():
        for version in store.versions(name):
            m = store.manifest(name, version)
            targets = ",".join(a.target for a in m.artifacts)
            rows.append((name, str(version), m.platform, targets, m.created_at.isoformat()))
    if not rows:
        print(f"no models in {store.root}")
        return 0
    table = [("MODEL", "VERSION", "PLATFORM", "TARGETS", "CREATED"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _models_show(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    manifest = store.manifest(args.name, args.version)
    if args.verify:
        store.verify(manifest)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def _models_push(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    manifest = store.push(Path(args.source), name=args.name)
    print(f"published {manifest.name} version {manifest.version} to {store.root}")
    return 0


def _models_rm(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    store.remove(args.name, args.version)
    print(f"removed {args.name} version {args.version} from {store.root}")
    return 0


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fermion", description="Fermion model-serving gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (KServe V2 over HTTP)")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--store", type=Path, help="model store root (store.root)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--backend", choices=["local", "ray"], help="replica backend (backend)")
    serve.add_argument("--keys-file", type=Path, help="API keys file (auth.keys_file)")
    serve.add_argument(
        "--demo-key",
        metavar="NAME",
        help="(re)create key NAME (infer:*,read) in the keys file and print it with the examples",
    )
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="list, show, push and remove published models")
    msub = models.add_subparsers(dest="models_command", required=True)

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, default=Path("model_store"), help="store root")

    p = msub.add_parser("list", help="every published version")
    store_arg(p)
    p.set_defaults(func=_models_list)
    p = msub.add_parser("show", help="a version's manifest (latest by default)")
    p.add_argument("name")
    p.add_argument("--version", type=int)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    store_arg(p)
    p.set_defaults(func=_models_show)
    p = msub.add_parser("push", help="publish a version directory as a new version")
    p.add_argument("source", help="a version directory holding manifest.json and its files")
    p.add_argument("--name", help="publish under this model name (default: the manifest's)")
    store_arg(p)
    p.set_defaults(func=_models_push)
    p = msub.add_parser("rm", help="remove one version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    store_arg(p)
    p.set_defaults(func=_models_rm)

    add_rollout_parsers(sub)
    add_keys_parser(sub)

    # The compile side (torch, onnx) is imported only when one of its commands runs.
    for name, spec in _COMPILE_COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=f"{name} a model (compile extra); see fermion {name} -h")
            continue
        module_name, _, attr = spec.partition(":")
        try:
            add: Callable[[Any], None] = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            stub = sub.add_parser(name, help=f"(needs the compile extra: {e.name} missing)")
            stub.set_defaults(func=_missing_extra(name, str(e)))
            continue
        add(sub)

    # fermion loadtest: imported only when it runs (locust itself runs in subprocesses).
    if command == "loadtest":
        from loadtest.cli import add_loadtest_parser

        add_loadtest_parser(sub)
    else:
        sub.add_parser("loadtest", help="load-test a gateway (loadtest extra); see -h")
    return parser


def _missing_extra(command: str, error: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(
            f"fermion {command} needs the compile extra (pip install 'fermion[compile]'): {error}",
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
