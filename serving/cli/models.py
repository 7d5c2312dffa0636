"""``fermion models list|show|push|rm``: the published versions in a model store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_store.store import ModelNotFoundError, ModelStore

__all__ = ["add_models_parser"]


def _list(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    if not store.root.is_dir():
        raise ModelNotFoundError(f"no model store at {store.root}")
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


def _show(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    manifest = store.manifest(args.name, args.version)
    if args.verify:
        store.verify(manifest)
    print(json.dumps(manifest.model_dump(mode="json"), indent=2))
    return 0


def _push(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    manifest = store.push(Path(args.source), name=args.name)
    print(f"published {manifest.name} version {manifest.version} to {store.root}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = ModelStore(args.store)
    store.remove(args.name, args.version)
    print(f"removed {args.name} version {args.version} from {store.root}")
    return 0


def add_models_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models list|show|push|rm`` to the ``fermion`` command line."""
    models = sub.add_parser("models", help="list, show, push and remove published models")
    msub = models.add_subparsers(dest="models_command", required=True)

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, default=Path("model_store"), help="store root")

    p = msub.add_parser("list", help="every published version")
    store_arg(p)
    p.set_defaults(func=_list)
    p = msub.add_parser("show", help="a version's manifest (latest by default)")
    p.add_argument("name")
    p.add_argument("--version", type=int)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    store_arg(p)
    p.set_defaults(func=_show)
    p = msub.add_parser("push", help="publish a version directory as a new version")
    p.add_argument("source", help="a version directory holding manifest.json and its files")
    p.add_argument("--name", help="publish under this model name (default: the manifest's)")
    store_arg(p)
    p.set_defaults(func=_push)
    p = msub.add_parser("rm", help="remove one version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    store_arg(p)
    p.set_defaults(func=_rm)
