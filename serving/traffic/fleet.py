"""One gateway as a member of a fleet: its identity, and the loop that keeps it in step.

Every ``control.sync_interval_s`` the loop applies a new route table version, reads
the rollouts (taking over one whose driver's lease expired), publishes this gateway's
share of the canary figures and returns idle rate-limit tokens; every
``control.heartbeat_s`` it writes a heartbeat. A store found empty (restarted without
its data) is seeded with the table and the running rollouts applied here. While the
store is down nothing changes here: the last applied routes keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from serving.config import ControlConfig
from serving.control.store import ControlStore, GatewayInfo, StoreUnavailable
from serving.inference.fleet_limits import FleetRateLimiter
from serving.traffic.canary import RolloutController
from serving.traffic.fleet_figures import FiguresPublisher
from serving.traffic.route_table import RouteTable

__all__ = ["FleetSync", "Gateway"]

log = logging.getLogger("fermion.fleet")


@dataclass
class Gateway:
    """Who this gateway is, as ``fermion fleet status`` lists it."""

    address: str
    backend: str
    id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    )
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)


class FleetSync:
    """Keeps one gateway in step with the fleet's control store."""

    def __init__(
        self,
        store: ControlStore,
        gateway: Gateway,
        config: ControlConfig,
        routes: RouteTable,
        rollouts: RolloutController,
        *,
        limiter: FleetRateLimiter | None = None,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self._config = config
        self._routes = routes
        self._rollouts = rollouts
        self._limiter = limiter
        self._figures = FiguresPublisher(routes, store)
        self._task: asyncio.Task[None] | None = None
        self._next_heartbeat = 0.0
        #: Gateways alive at the last heartbeat (this one included).
        self.live = 1

    async def start(self) -> None:
        """Connect, apply the fleet's routes once (or seed an empty store), then loop."""
        await self.store.start()
        await self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop, hand back leased tokens and leave the fleet."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreUnavailable):
            if self._limiter is not None:
                await self._limiter.give_back(everything=True)
            await self.store.leave(self.gateway.id)
        await self.store.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.sync_interval_s)
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one bad tick
                log.exception("fleet sync failed")

    async def tick(self) -> None:
        """One round of keeping in step (a store that is down skips the rest of it)."""
        try:
            version = await self.store.route_version()
            if version is None:
                await self._seed()
            elif version != self._routes.applied_version:
                await self._routes.pull()
            for name in await self._rollouts.refresh():
                await self._rollouts.take_over(name)
            await self._figures.publish(self._rollouts.running_rollouts())
            if self._limiter is not None:
                await self._limiter.give_back()
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self._config.heartbeat_s
                self.live = await self.store.heartbeat(
                    self.gateway.id, self.heartbeat_info(), 3 * self._config.heartbeat_s
                )
        except StoreUnavailable:
            self._next_heartbeat = 0.0  # announce ourselves as soon as it is back

    async def _seed(self) -> None:
        snapshot = self._routes.snapshot()
        running = self._rollouts.running_states()
        if await self.store.seed_routes(snapshot):
            log.warning(
                "the control store held no route table: seeded it with version %d (%d routes)"
                " and %d running rollouts",
                snapshot.version,
                len(snapshot.routes),
                len(running),
            )
        await self.store.seed_rollouts(running)
        await self._routes.pull()

    def heartbeat_info(self) -> dict[str, object]:
        """What the heartbeat says about this gateway."""
        return {
            **asdict(self.gateway),
            "route_version": self._routes.applied_version,
            "driving": self._rollouts.driving(),
        }

    async def gateways(self) -> list[GatewayInfo]:
        """Every gateway of the fleet (StoreUnavailable while the store is down)."""
        return await self.store.gateways()

    def collect(self) -> Iterator[Metric]:
        """The fleet families: whether the store answers, live gateways, applied version."""
        up = GaugeMetricFamily(
            "fermion_control_store_up",
            "1 while the shared control store answers, 0 while it does not.",
        )
        up.add_metric([], 1.0 if self.store.up else 0.0)
        yield up
        live = GaugeMetricFamily(
            "fermion_fleet_gateways", "Gateways of the fleet alive at the last heartbeat."
        )
        live.add_metric([], self.live)
        yield live
        version = GaugeMetricFamily(
            "fermion_route_table_version", "Version of the fleet's route table applied here."
        )
        version.add_metric([], self._routes.applied_version)
        yield version
