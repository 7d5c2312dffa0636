"""A stuck shutdown says where it waits: every pending task's and every thread's stack."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest

from serving.config import ServerConfig
from serving.http.drain import DrainState
from serving.http.server import GatewayServer
from serving.http.stuck import StuckReport


async def _waits_for_the_store(event: asyncio.Event) -> None:
    await event.wait()


async def test_a_stop_past_its_delay_logs_the_pending_tasks_and_the_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()
    waiting = asyncio.create_task(_waits_for_the_store(never))
    caplog.set_level(logging.WARNING, "fermion.gateway")
    async with StuckReport("the stop", 0.1) as report:
        await asyncio.sleep(0.6)
    waiting.cancel()
    assert report.report is not None
    assert "_waits_for_the_store" in report.report  # the task, at its await
    assert "thread MainThread" in report.report
    assert "the stop still running after 0.1 s" in caplog.text
    assert caplog.text.count("still running after") == 1  # once


async def test_a_blocked_loop_is_reported_from_the_threads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "fermion.gateway")
    async with StuckReport("the stop", 0.1) as report:
        time.sleep(1.5)  # the point: a stop that blocks the loop
    assert report.report is not None
    assert "the event loop is blocked" in report.report
    assert "test_a_blocked_loop_is_reported_from_the_threads" in report.report  # main's stack
    await asyncio.sleep(0.05)  # the loop's own late answer adds nothing
    assert caplog.text.count("still running after") == 1


async def test_a_stop_within_its_delay_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async with StuckReport("the stop", 0.3) as report:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    assert report.report is None
    assert "still running" not in caplog.text


async def test_the_gateway_reports_a_shutdown_that_hangs(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:  # a part of the shutdown that waits on something
                await _waits_for_the_store(release)
                await send({"type": "lifespan.shutdown.complete"})
                return

    caplog.set_level(logging.WARNING, "fermion.gateway")
    server = GatewayServer(app, ServerConfig(), DrainState())
    server.stuck_report_s = 0.1
    sock = socket.create_server(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    server.should_exit = True
    await asyncio.sleep(0.8)
    release.set()
    await serving
    sock.close()
    assert "the shutdown (models, fleet, backend) still running after 0.1 s" in caplog.text
    assert "_waits_for_the_store" in caplog.text
    assert server.exit_code == 0  # a report only
