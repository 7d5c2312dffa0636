"""Fermion's channel to a replica: its frames, and a real server and client over loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
import uvloop

from serving.inference.backends.channel import (
    ChannelDraining,
    ChannelError,
    ChannelGone,
    ChannelServer,
    ChannelUnreachable,
    FrameError,
    ReplicaChannel,
    decode,
    encode,
)
from tests.helpers.channel_peers import replica_dying_mid_batch
from tests.helpers.polling import until

TOKEN = "s3cret-token"
_T = TypeVar("_T")


def _payload(parts: list[bytes | memoryview]) -> bytes:
    """A frame's payload (its length prefix checked and cut off)."""
    frame = b"".join(bytes(p) for p in parts)
    (length,) = struct.unpack_from("<Q", frame)
    assert length == len(frame) - 8
    return frame[8:]


def _raw_payload(header: Any, body: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    return struct.pack("<I", len(head)) + head + body


# -- frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.array([1.5, -2.0], np.float16),
        np.array([-(2**62), 2**62], np.int64),
        np.array([0, 255], np.uint8),
        np.array([-128, 127], np.int8),
        np.array([True, False, True]),
        np.array([1 + 2j], np.complex64),
        np.zeros((0, 3), np.float32),
        np.array(3.5, dtype=np.float32),  # 0-d
        np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],  # not contiguous
        np.arange(4, dtype=">f4"),  # big-endian: sent little-endian, same values
        np.array(["a", "ünï", ""], dtype=object).reshape(3, 1),
        np.array([b"\x00\xff", b""], dtype=object),
        np.array(["x", "yz"]),  # numpy str: sent as str elements
    ],
    ids=lambda v: f"{v.dtype}{list(v.shape)}",
)
def test_a_tensor_comes_back_equal(value: np.ndarray) -> None:
    meta, tensors = decode(
        _payload(encode({"t": value, "u": np.ones(2, np.float32)}, c={"k": "v"}))
    )
    assert meta == {"c": {"k": "v"}}
    assert list(tensors) == ["t", "u"]
    got = tensors["t"]
    assert got.shape == value.shape
    if value.dtype.kind in "OU":
        assert got.dtype == object
        assert got.tolist() == value.astype(object).tolist()
    else:
        assert got.dtype == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got, value)


def test_decoded_tensors_are_views_of_the_frame_not_copies() -> None:
    payload = bytearray(_payload(encode({"x": np.arange(1000, dtype=np.float32)})))
    _, tensors = decode(payload)
    payload[-4:] = np.float32(-1).tobytes()
    assert tensors["x"][-1] == -1


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"x": np.array(["a", b"b"], dtype=object)}, "only bytes or only str"),
        ({"x": np.array([1, None], dtype=object)}, "only bytes or only str"),
        ({"x": np.array(["2024-01-01"], dtype="datetime64[D]")}, "cannot cross"),
    ],
    ids=["mixed", "none", "datetime"],
)
def test_a_tensor_the_channel_cannot_carry_is_refused_on_encoding(
    tensors: dict[str, np.ndarray], match: str
) -> None:
    with pytest.raises(FrameError, match=match):
        encode(tensors)


_F4 = np.arange(4, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01", "shorter than its header length"),
        (struct.pack("<I", 99) + b"{}", "runs past the payload"),
        (struct.pack("<I", 3) + b"{x}", "not JSON"),
        (_raw_payload([1, 2]), "not an object"),
        (_raw_payload({"t": {}}), "not an object with a tensor list"),
        (_raw_payload({"t": [["x", "<f4", [4]]]}, _F4), "not \\[name, dtype, shape, nbytes\\]"),
        (_raw_payload({"t": [["x", "<f4", [-4], 16]]}, _F4), "bad tensor spec"),
        (_raw_payload({"t": [["x", "<f4", [4.0], 16]]}, _F4), "bad tensor spec"),
        (_raw_payload({"t": [["x", "<f4", [4], True]]}, _F4), "bad tensor spec"),
        (_raw_payload({"t": [[1, "<f4", [4], 16]]}, _F4), "bad tensor spec"),
        (_raw_payload({"t": [["x", "<f4", [4], 32]]}, _F4), "runs past the payload"),
        (_raw_payload({"t": [["x", "<f4", [5], 16]]}, _F4), "16 bytes for shape"),
        (_raw_payload({"t": [["x", "<f4", [2], 8]]}, _F4), "8 bytes left over"),
        (_raw_payload({"t": [["x", ">f4", [4], 16]]}, _F4), "not a little-endian number"),
        (_raw_payload({"t": [["x", "|O8", [2], 16]]}, _F4), "not a little-endian number"),
        (_raw_payload({"t": [["x", "<V16", [1], 16]]}, _F4), "not a little-endian number"),
        (_raw_payload({"t": [["x", "<f3", [1], 3]]}, b"abc"), "unknown dtype"),
        (_raw_payload({"t": [["x", "str", [2], 5]]}, struct.pack("<I", 1) + b"a"), "ends after 1"),
        (_raw_payload({"t": [["x", "str", [1], 5]]}, struct.pack("<I", 9) + b"a"), "runs past"),
        (_raw_payload({"t": [["x", "str", [1], 6]]}, struct.pack("<I", 1) + b"ab"), "left over"),
        (_raw_payload({"t": [["x", "str", [1], 5]]}, struct.pack("<I", 1) + b"\xff"), "UTF-8"),
    ],
)
def test_a_bad_frame_is_a_frame_error_never_a_crash(payload: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        decode(payload)


# -- a server and a client over loopback -----------------------------------------------------

Runner = Callable[[Coroutine[Any, Any, _T]], _T]


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Runs a coroutine on the gateway's loop (uvloop), or asyncio's own."""
    runner: Runner[Any] = uvloop.run if request.param == "uvloop" else asyncio.run
    return runner


class _Replica:
    """What a replica computes: doubles ``x``; ``fail`` raises, ``sleep`` waits first."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, np.ndarray], dict[str, str] | None]] = []

    def run(
        self, inputs: dict[str, np.ndarray], carrier: dict[str, str] | None
    ) -> dict[str, np.ndarray]:
        self.calls.append((inputs, carrier))
        if "fail" in inputs:
            raise ValueError("bad rank 3\nsecond line")
        if "sleep" in inputs:
            time.sleep(float(inputs["sleep"][0]))
        return {"y": inputs["x"] * 2}


@pytest.fixture()
def replica() -> _Replica:
    return _Replica()


@pytest.fixture()
def server(replica: _Replica) -> Iterator[ChannelServer]:
    server = ChannelServer(replica.run, host="127.0.0.1", token=TOKEN)
    server.start()
    yield server
    server.close()


def _x(value: float, n: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full(n, value, np.float32)}


def test_a_batch_crosses_and_its_answer_comes_back(
    run: Runner[Any], server: ChannelServer, replica: _Replica
) -> None:
    async def go() -> dict[str, np.ndarray]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=2)
        try:
            return await channel.call(_x(1.5), {"traceparent": "00-ab-cd-01"})
        finally:
            channel.close()

    outputs = run(go())
    np.testing.assert_array_equal(outputs["y"], np.full(3, 3.0, np.float32))
    [(inputs, carrier)] = replica.calls
    np.testing.assert_array_equal(inputs["x"], _x(1.5)["x"])
    assert carrier == {"traceparent": "00-ab-cd-01"}


def test_concurrent_batches_each_get_their_own_answer(
    run: Runner[Any], server: ChannelServer
) -> None:
    async def go() -> list[dict[str, np.ndarray]]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=8)
        try:
            return await asyncio.gather(*(channel.call(_x(i, n=i + 1)) for i in range(8)))
        finally:
            channel.close()

    for i, outputs in enumerate(run(go())):
        np.testing.assert_array_equal(outputs["y"], np.full(i + 1, 2 * i, np.float32))


def test_a_replica_error_is_a_channel_error_and_the_connection_stays(
    run: Runner[Any], server: ChannelServer, replica: _Replica
) -> None:
    async def go() -> dict[str, np.ndarray]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        try:
            with pytest.raises(ChannelError, match=r"^bad rank 3$"):
                await channel.call({"fail": np.zeros(1, np.float32)})
            link = channel._idle[0]
            outputs = await channel.call(_x(2.0))
            assert channel._idle == [link], "the same connection served the next batch"
            return outputs
        finally:
            channel.close()

    np.testing.assert_array_equal(run(go())["y"], np.full(3, 4.0, np.float32))
    assert len(replica.calls) == 2


def test_a_wrong_token_gets_no_connection_and_computes_nothing(
    run: Runner[Any], server: ChannelServer, replica: _Replica
) -> None:
    async def go() -> None:
        channel = ReplicaChannel("r1", server.address, "not-the-token", limit=1)
        with pytest.raises(ChannelUnreachable, match=r"cannot connect|connection lost"):
            await channel.call(_x(1.0))

    run(go())
    assert replica.calls == []


def test_a_batch_cancelled_mid_way_never_hands_its_answer_to_the_next(
    run: Runner[Any],
    server: ChannelServer,
) -> None:
    async def go() -> dict[str, np.ndarray]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        try:
            slow = {"x": np.full(3, 7.0, np.float32), "sleep": np.array([0.3], np.float32)}
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await channel.call(slow)
            assert channel.in_flight == 0
            assert channel._idle == [], "the connection with an answer still to come is closed"
            return await channel.call(_x(1.0))
        finally:
            channel.close()

    np.testing.assert_array_equal(run(go())["y"], np.full(3, 2.0, np.float32))


def test_a_closed_server_finishes_its_batch_then_refuses_new_connections(
    run: Runner[Any], server: ChannelServer, replica: _Replica
) -> None:
    async def go() -> None:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=2)
        slow = {"x": np.full(3, 1.0, np.float32), "sleep": np.array([0.3], np.float32)}
        in_progress = asyncio.create_task(channel.call(slow))
        await asyncio.sleep(0.1)
        server.close()
        outputs = await in_progress
        np.testing.assert_array_equal(outputs["y"], np.full(3, 2.0, np.float32))
        with pytest.raises(ChannelGone):
            await channel.call(_x(1.0))  # its connection closed after the answer
        with pytest.raises(ChannelUnreachable):
            await channel.call(_x(1.0))  # and nothing listens any more
        channel.close()

    run(go())


def test_a_draining_server_sends_new_batches_back_uncomputed_and_answers_those_in_progress(
    run: Runner[Any], server: ChannelServer, replica: _Replica
) -> None:
    drained: list[tuple[bool, float]] = []

    def drain() -> None:
        started = time.monotonic()
        done = server.drain(quiet_s=30.0, timeout_s=60.0)
        drained.append((done, time.monotonic() - started))

    async def go() -> None:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=2)
        await asyncio.gather(channel.call(_x(1.0)), channel.call(_x(1.0)))  # two connections
        slow = {"x": np.full(3, 1.0, np.float32), "sleep": np.array([0.3], np.float32)}
        in_progress = asyncio.create_task(channel.call(slow))
        await until(lambda: server.in_progress == 1, "the slow batch in progress")
        draining = asyncio.create_task(asyncio.to_thread(drain))
        await until(lambda: server.draining, "the server draining")
        with pytest.raises(ChannelDraining, match="replica r1 is shutting down"):
            await channel.call(_x(5.0))  # on the other connection: sent back, not computed
        np.testing.assert_array_equal((await in_progress)["y"], np.full(3, 2.0, np.float32))
        with pytest.raises(ChannelUnreachable):
            await ReplicaChannel("r1", server.address, TOKEN, limit=1).call(_x(1.0))
        assert not draining.done(), "the gateway still holds its connections"
        channel.close()  # what a gateway does with a replica that drains
        await draining

    run(go())
    [(done, waited)] = drained
    assert done, "no batch was left in progress"
    assert waited < 30.0, "returned once the gateway let go, not after quiet_s"
    assert [float(inputs["x"][0]) for inputs, _ in replica.calls] == [1.0, 1.0, 1.0]


def test_a_drain_waits_quiet_s_for_an_idle_gateway_and_timeout_s_for_a_batch(
    run: Runner[Any], server: ChannelServer
) -> None:
    async def go() -> None:
        idle = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        await idle.call(_x(1.0))  # an idle connection stays open
        started = time.monotonic()
        assert await asyncio.to_thread(server.drain, quiet_s=0.3, timeout_s=30.0) is True
        assert 0.3 <= time.monotonic() - started < 30.0
        idle.close()

    run(go())

    stuck = ChannelServer(_sleeper, host="127.0.0.1", token=TOKEN)
    stuck.start()

    async def stuck_batch() -> None:
        channel = ReplicaChannel("r1", stuck.address, TOKEN, limit=1)
        batch = asyncio.create_task(channel.call(_x(1.0)))
        await until(lambda: stuck.in_progress == 1, "the stuck batch in progress")
        started = time.monotonic()
        assert await asyncio.to_thread(stuck.drain, quiet_s=0.1, timeout_s=0.5) is False
        assert 0.5 <= time.monotonic() - started < 30.0, "waited for the batch, up to timeout_s"
        batch.cancel()
        channel.close()

    try:
        run(stuck_batch())
    finally:
        stuck.close()


def _sleeper(inputs: dict[str, np.ndarray], carrier: dict[str, str] | None) -> Any:
    time.sleep(5.0)
    return {}


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_load_is_the_mean_number_of_batches_in_progress_since_it_was_last_read(
    run: Runner[Any],
) -> None:
    clock = _Clock()

    def compute(inputs: dict[str, np.ndarray], carrier: dict[str, str] | None) -> Any:
        clock.now += float(inputs["x"][0])  # the batch takes that many seconds
        return {"y": inputs["x"]}

    server = ChannelServer(compute, host="127.0.0.1", token=TOKEN, clock=clock)
    server.start()

    async def go() -> None:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        await channel.call(_x(3.0))
        clock.now += 1.0  # then idle for a second
        assert server.load() == pytest.approx(3.0 / 4.0)
        clock.now += 2.0
        assert server.load() == 0.0, "counted from the last read"
        await channel.call(_x(0.5))
        assert server.load() == 1.0, "busy all the time since the last read"
        channel.close()

    try:
        run(go())
    finally:
        server.close()


def test_batches_in_progress_together_count_together(
    run: Runner[Any], server: ChannelServer
) -> None:
    async def go() -> float:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=2)
        await asyncio.gather(channel.call(_x(1.0)), channel.call(_x(1.0)))  # two connections
        server.load()
        slow = {"x": np.full(3, 1.0, np.float32), "sleep": np.array([0.5], np.float32)}
        await asyncio.gather(channel.call(slow), channel.call(slow))
        channel.close()
        return server.load()

    assert 1.0 < run(go()) <= 2.0


def test_a_replica_dying_mid_batch_is_channel_gone_not_unreachable(
    run: Runner[Any],
) -> None:
    async def go(address: str) -> None:
        channel = ReplicaChannel("r1", address, TOKEN, limit=1)
        with pytest.raises(ChannelGone) as raised:
            await channel.call(_x(1.0))
        assert not isinstance(raised.value, ChannelUnreachable), "the batch had been sent"

    with replica_dying_mid_batch() as address:
        run(go(address))


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a length of ~5e18: over the hello's limit
        struct.pack("<Q", 10) + b"0123456789",  # a hello that is not a frame
        struct.pack("<Q", 5000),  # a hello too long
        b"\x00\x00",  # a cut length, then EOF
    ],
    ids=["http", "not-a-frame", "long-hello", "cut"],
)
def test_a_hostile_connection_is_closed_and_the_server_keeps_serving(
    run: Runner[Any], server: ChannelServer, replica: _Replica, garbage: bytes
) -> None:
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as hostile:
        try:
            hostile.sendall(garbage)
            hostile.shutdown(socket.SHUT_WR)
            answer = hostile.recv(1024)
        except OSError:  # reset: closed with the garbage unread
            answer = b""
        assert answer == b"", "closed without an answer"

    async def go() -> dict[str, np.ndarray]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        try:
            return await channel.call(_x(3.0))
        finally:
            channel.close()

    np.testing.assert_array_equal(run(go())["y"], np.full(3, 6.0, np.float32))
    assert len(replica.calls) == 1


def test_nothing_listening_is_unreachable(
    run: Runner[Any],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed at the end of the block: nothing listens

    async def go() -> None:
        channel = ReplicaChannel("r1", f"127.0.0.1:{port}", TOKEN, limit=1)
        with pytest.raises(ChannelUnreachable, match="cannot connect"):
            await channel.call(_x(1.0))
        assert channel.in_flight == 0

    run(go())


def test_a_connection_that_never_says_hello_is_closed_after_the_hello_timeout(
    replica: _Replica,
) -> None:
    server = ChannelServer(replica.run, host="127.0.0.1", token=TOKEN, hello_timeout_s=0.2)
    server.start()
    try:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b"", "closed by the replica"
            assert time.monotonic() - started < 5
    finally:
        server.close()


def test_connections_past_the_limit_are_closed_and_those_within_serve(
    run: Runner[Any], replica: _Replica
) -> None:
    server = ChannelServer(replica.run, host="127.0.0.1", token=TOKEN, max_connections=2)
    server.start()
    host, port = server.address.rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection((host, int(port)), timeout=10) as third:
            try:
                answer = third.recv(1)
            except OSError:  # reset
                answer = b""
            assert answer == b""
        for sock in held:
            sock.close()
        held.clear()

        async def go() -> dict[str, np.ndarray]:
            channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
            for _ in range(50):  # the server notices the two closes
                try:
                    return await channel.call(_x(1.0))
                except ChannelUnreachable:
                    await asyncio.sleep(0.05)
                finally:
                    channel.close()
            raise AssertionError("no connection once the others closed")

        np.testing.assert_array_equal(run(go())["y"], np.full(3, 2.0, np.float32))
    finally:
        for sock in held:
            sock.close()
        server.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")
def test_a_replica_on_an_ipv6_node_address_is_reached(run: Runner[Any], replica: _Replica) -> None:
    server = ChannelServer(replica.run, host="::1", token=TOKEN)
    server.start()

    async def go() -> dict[str, np.ndarray]:
        channel = ReplicaChannel("r1", server.address, TOKEN, limit=1)
        try:
            return await channel.call(_x(2.0))
        finally:
            channel.close()

    try:
        np.testing.assert_array_equal(run(go())["y"], np.full(3, 4.0, np.float32))
    finally:
        server.close()
