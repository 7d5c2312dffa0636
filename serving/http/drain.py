"""The draining flag: set on SIGTERM, read by readiness and by every connection."""

from __future__ import annotations

import time

__all__ = ["DrainState"]


class DrainState:
    """Whether the gateway is draining: still serving, but asking to be taken out of rotation.

    While it drains, ``GET /v2/health/ready`` answers 503 and every response closes its
    connection, so that load balancers and clients move to other gateways before the
    listener closes.
    """

    __slots__ = ("since",)

    def __init__(self) -> None:
        #: ``time.monotonic()`` when draining began; None while serving normally.
        self.since: float | None = None

    @property
    def draining(self) -> bool:
        """True once ``begin`` was called."""
        return self.since is not None

    def begin(self) -> None:
        """Start draining (again: no change)."""
        if self.since is None:
            self.since = time.monotonic()
