"""``fermion serve``: run the gateway (KServe V2 over HTTP, and gRPC) with uvicorn.

The listening socket is bound here, before uvicorn starts, so that ``--port 0`` works:
the OS picks a free port, and once the server listens it prints
``Fermion listening on http://HOST:PORT`` (the real port) on stdout. The gRPC server
(``server.grpc_port``, ``--grpc-port``) runs on the same event loop, started with the
app, and prints ``Fermion gRPC listening on HOST:PORT`` the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.config import ConfigError, load_config

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from serving.config import FermionConfig
    from serving.http.app import Companion
    from serving.inference.repository import ModelRepository

__all__ = ["add_serve_parser"]

#: The port when ``--port`` is not given (over the config file's): images set it, and
#: their HEALTHCHECK reads it too.
PORT_ENV = "FERMION_PORT"
#: The address other gateways and ``fermion fleet status`` show for this one
#: (``control.advertise``), e.g. ``$(POD_IP):8000`` in a Kubernetes pod.
ADVERTISE_ENV = "FERMION_ADVERTISE"
#: What ``fermion serve`` returns when the server cannot start (uvicorn's own code).
_STARTUP_FAILURE = 3
#: ``--grpc-port`` not given (None means ``off``).
_UNSET: Any = object()


def _demo_key(name: str, keys_file: Path | None) -> str:
    from serving.auth import create_key

    if keys_file is None:
        raise ConfigError("--demo-key needs a keys file (--keys-file or auth.keys_file)")
    return create_key(keys_file, name, ["infer:*", "read"], replace=True)


def _grpc_port(value: str) -> int | None:
    """``--grpc-port``: a port number, or ``off``."""
    if value.strip().lower() == "off":
        return None
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port or 'off': {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range 0-65535")
    return port


def _grpc_companion(config: FermionConfig, port: int, *, share: bool) -> Companion:
    """The gRPC server as a companion of the app: same loop, same inference service.

    ``share``: the port is shared with the other workers of the host (SO_REUSEPORT).
    """

    def companion(app: Starlette) -> contextlib.AbstractAsyncContextManager[int]:
        from serving.grpc.server import serve_grpc

        state = app.state
        return serve_grpc(
            host=config.server.host,
            port=port,
            service=state.service,
            repository=state.repository,
            backend=config.backend,
            access=state.access,
            limiter=state.limiter,
            metrics=state.metrics,
            on_listening=lambda address: print(f"Fermion gRPC listening on {address}", flush=True),
            share_port=share,
            draining=lambda: state.drain.draining,
        )

    return companion


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(args: argparse.Namespace) -> int:
    from serving.cli.banner import start_banner
    from serving.cli.workers import WorkerSlot, bind_listener, supervise, with_siblings
    from serving.http.app import create_app
    from serving.http.server import GatewayServer
    from serving.inference.gil import switch_interval
    from serving.inference.heap import HeapPolicy

    overrides: dict[str, Any] = {}
    if args.store is not None:
        overrides["store.root"] = str(args.store)
    if args.host is not None:
        overrides["server.host"] = args.host
    port = args.port if args.port is not None else os.environ.get(PORT_ENV)
    if port is not None:
        overrides["server.port"] = port
    if os.environ.get(ADVERTISE_ENV):
        overrides["control.advertise"] = os.environ[ADVERTISE_ENV]
    if args.grpc_port is not _UNSET:
        overrides["server.grpc_port"] = args.grpc_port
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.keys_file is not None:
        overrides["auth.keys_file"] = str(args.keys_file)
    if args.workers is not None:
        overrides["server.workers"] = args.workers
    config = load_config(args.config, overrides)
    demo_key = _demo_key(args.demo_key, config.auth.keys_file) if args.demo_key else None
    if config.server.access_log:
        from serving.http.middleware.access_log import configure_access_logger

        configure_access_logger()
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.allow_empty and not config.models:
        from model_store.store import ModelStore

        if not ModelStore(config.store.root).models():
            print(
                f"fermion: nothing to serve: no model in {config.store.root} and none "
                "configured (--allow-empty serves anyway, not ready until a model loads)",
                file=sys.stderr,
            )
            return 2
    host = config.server.host
    # --workers N: this process supervises N workers, each a `fermion serve --worker ...`.
    slot = WorkerSlot.parse(args.worker) if args.worker else None
    grpc_port = config.server.grpc_port
    if grpc_port and slot is None:  # a fixed port: refuse one in use now, as for HTTP
        try:
            bind_listener(host, grpc_port).close()
        except OSError as e:
            print(f"fermion: cannot listen for gRPC on {host}:{grpc_port}: {e}", file=sys.stderr)
            return _STARTUP_FAILURE
    try:
        if config.server.workers > 1 and slot is None:
            if demo_key:
                print(f"demo API key {args.demo_key}: {demo_key}", flush=True)
            return supervise(config, args)
        sock = slot.socket() if slot else bind_listener(host, config.server.port)
    except OSError as e:
        print(f"fermion: cannot listen on {host}:{config.server.port}: {e}", file=sys.stderr)
        return _STARTUP_FAILURE
    base_url = _url(host, sock.getsockname()[1])
    config.server.port = sock.getsockname()[1]  # the address the fleet listing shows

    def on_ready(repo: ModelRepository) -> None:
        if slot is not None and slot.index > 0:
            return  # the first worker speaks for all
        print(start_banner(repo, base_url, api_key=demo_key), flush=True)

    companions = (
        [] if grpc_port is None else [_grpc_companion(config, grpc_port, share=slot is not None)]
    )
    heap = HeapPolicy(
        freeze=config.server.gc_freeze, young_threshold=config.server.gc_young_threshold
    )
    app = create_app(
        config,
        on_ready=on_ready,
        config_path=args.config,
        companions=companions,
        heap=heap,
    )
    server = GatewayServer(
        with_siblings(app, slot) if slot else app,
        config.server,
        app.state.drain,
        refuser=app.state.service,
        announce=f"Fermion listening on {base_url}",
    )
    interval_ms = config.server.gil_switch_interval_ms
    with sock, switch_interval(None if interval_ms is None else interval_ms / 1e3):
        server.run(sockets=[sock])
    return server.exit_code if server.started else _STARTUP_FAILURE


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``fermion`` command line."""
    serve = sub.add_parser("serve", help="run the gateway (KServe V2 over HTTP and gRPC)")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--store", type=Path, help="model store root (store.root)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument(
        "--port",
        type=int,
        help=f"listen port (server.port, or ${PORT_ENV}); 0: a free one, printed once listening",
    )
    serve.add_argument(
        "--backend", choices=["local", "ray", "remote"], help="replica backend (backend)"
    )
    serve.add_argument(
        "--grpc-port",
        type=_grpc_port,
        default=_UNSET,
        metavar="PORT|off",
        help="V2 gRPC port (server.grpc_port, default 8001); 0: a free one, printed once "
        "listening; off: no gRPC",
    )
    serve.add_argument("--keys-file", type=Path, help="API keys file (auth.keys_file)")
    serve.add_argument(
        "--demo-key",
        metavar="NAME",
        help="(re)create key NAME (infer:*,read) in the keys file and print it with the examples",
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="gateway processes sharing the port (server.workers); above 1 needs control.store",
    )
    serve.add_argument("--worker", help=argparse.SUPPRESS)  # set by the supervisor
    serve.add_argument(
        "--allow-empty",
        action="store_true",
        help="start even with nothing to serve (else exit 2); not ready until a model loads",
    )
    serve.set_defaults(func=_serve)
