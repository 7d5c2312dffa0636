"""What the open-loop engine sends requests through: a small interface and a table of them.

A transport reads the model's metadata, turns encoded inference requests (``Payload``,
built once from that metadata) into ``Call`` objects of its own protocol, sends one call
at a time per caller and answers an ``Outcome``. It never raises for a failed request: a
refusal, a timeout or a refused connection is an ``Outcome`` with a status (0 when no
answer came) and the message the report shows. The engine owns concurrency, pacing and
timing.

``TRANSPORTS`` maps a ``--protocol`` name to ``"module:factory"``; a transport module is
imported only when chosen (an HTTP run never imports grpc).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from loadtest.payloads import Payload
from model_store.importer import import_from_string

__all__ = ["TRANSPORTS", "Call", "Outcome", "Transport", "TransportOptions", "load_transport"]

#: ``--protocol`` name -> ``"module:factory"`` (factory(TransportOptions) -> Transport).
TRANSPORTS: Final = {
    "http": "loadtest.http_client:HttpTransport",
    "grpc": "loadtest.grpc_transport:GrpcTransport",
}


@dataclass(frozen=True)
class Call:
    """One request ready to send: a path (HTTP) or method name, its body and headers."""

    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What came back: ``status`` (0: no answer), the version that served a success, and
    ``error`` (``"<status> <message>"``) for a failure."""

    status: int
    version: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None


@dataclass(frozen=True)
class TransportOptions:
    """How to reach the gateways: base URLs or gRPC addresses (requests go round-robin),
    the most connections open at once (gRPC: calls in flight) per gateway, headers sent
    with every request, and the answer timeout."""

    targets: Sequence[str]
    max_connections: int = 1000
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0


class Transport(Protocol):
    """Sends calls to the gateways and reports each one's outcome."""

    async def metadata(self, model: str, version: str | None) -> dict[str, Any]:
        """The model's V2 metadata (inputs, outputs) from the first gateway; raises
        ``loadtest.gateway.GatewayError`` naming the gateway when it cannot."""

    def calls(self, model: str, version: str | None, payloads: Sequence[Payload]) -> list[Call]:
        """The calls of this protocol for inference requests ``payloads`` to ``model``."""

    async def send(self, call: Call) -> Outcome:
        """Send one call and wait for its outcome (cancellation abandons it cleanly)."""

    async def aclose(self) -> None:
        """Close every connection."""


def load_transport(name: str) -> Callable[[TransportOptions], Transport]:
    """The transport factory ``name`` names in ``TRANSPORTS`` (ValueError when unknown)."""
    target = TRANSPORTS.get(name)
    if target is None:
        raise ValueError(f"unknown protocol {name!r} (one of {', '.join(TRANSPORTS)})")
    factory: Callable[[TransportOptions], Transport] = import_from_string(target)
    return factory
