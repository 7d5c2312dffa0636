"""Dynamic batching per model version: a bounded queue in front of one batch runner.

When a runner slot is free a request is dispatched at once (no waiting at low
load); while batches run, arrivals gather into the next batch. A request whose
batch dimension is > 1 stays whole; outputs are split back row-exactly. A failing
batch fails only its own requests. Priority levels order the queue (Triton's
queue policy: level 1 first); a request whose deadline passes while it waits is
dropped, never computed, and fails with 504.

Admission (``admit``) is checked before a request's body is read or decoded: a
full queue, or one holding more work than the request's deadline leaves time for
(estimated from recent batches), refuses it with 503 and Retry-After at the cost of
a header. Before refusing, the heads of the queue that can no longer meet their own
deadlines are dropped (504), and so are they when a batch is taken.

A backend that computes on its own threads (``ThreadedRunner``: backend ``local``) gets
its batches started from those threads: a worker that finishes a batch takes the next
one from the queue itself, before the event loop has even heard of the first. Waiting
for the loop instead (the answer's callback, then the batch's task) kept the model idle
behind whatever the loop was doing meanwhile (decoding a burst of requests): at 64
clients the pool computed only a third to a half of the time. The loop still answers,
fails and counts; the queue is shared under a lock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import (
    DeadlineExceeded,
    FermionError,
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    Overloaded,
)
from serving.observability import tracing as _tracing
from serving.observability.counters import VersionCounter

__all__ = ["BatchRunner", "DynamicBatcher", "InlineRunner", "ThreadedRunner", "batch_deadline_ns"]

log = logging.getLogger(__name__)

#: While a batch runs: the last deadline (``time.perf_counter_ns``) of its requests,
#: or None when one of them has none. Past it nobody waits for the batch, so a
#: backend can stop waiting for a remote answer then.
batch_deadline_ns: ContextVar[int | None] = ContextVar("fermion_batch_deadline_ns", default=None)

#: Computes one batch: named inputs with the batch in dim 0 -> named outputs.
BatchRunner = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]
#: Lone batches in a row before one may run inline (traffic of one request at a time).
_LONE_STREAK = 8
#: A queued request's deadline this close has come when the sweep runs (the event
#: loop's timers fire to the millisecond).
_SWEEP_SLACK_NS = 1_000_000
#: Runs a batch on the calling thread, or declines (None) without doing anything.
InlineRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray] | None]


@dataclass(frozen=True, slots=True)
class ThreadedRunner:
    """A backend that computes batches on its own worker threads.

    ``submit(job)`` hands ``job`` to a worker thread and returns at once (from any
    thread); it raises when the workers are gone. ``run(inputs)`` computes one batch on
    the calling thread (a worker's).
    """

    submit: Callable[[Callable[[], None]], None]
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(slots=True, eq=False)
class _Pending:
    # Never in its repr: formatting an image's tensor costs milliseconds of the loop.
    inputs: dict[str, np.ndarray] = field(repr=False)
    rows: int
    shape_key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued_ns: int
    #: Index of its priority level's queue (0 is served first).
    level: int = 0
    #: perf_counter_ns deadline; 0: none.
    deadline_ns: int = 0
    #: With tracing on: the request's span and its queue-wait span.
    span: Any = None
    queue_span: Any = None
    #: In its level's queue (False once a batch took it).
    queued: bool = False


@dataclass(slots=True, eq=False)
class _Ran:
    """What a worker thread did with a batch, for the event loop to answer and count."""

    #: Requests to fail with DeadlineExceeded, and the message.
    expired: list[tuple[_Pending, str]] = field(default_factory=list)
    #: Each computation: its requests, rows, start and end (perf_counter_ns), success.
    records: list[tuple[list[_Pending], int, int, int, bool]] = field(default_factory=list)
    #: Each computed request's outputs, or its error.
    outcomes: list[tuple[_Pending, dict[str, np.ndarray] | Exception]] = field(default_factory=list)
    #: The worker gives its runner slot back (no next batch): counted once answered, so
    #: that ``close`` returns only when every answer is out.
    release: bool = False


def _failure(e: Exception) -> FermionError:
    """What the clients of a failed batch get: a gateway error as it is, else a 500."""
    return e if isinstance(e, FermionError) else InferenceFailed(f"inference failed: {e}")


def _live(batch: list[_Pending], now: int, late: list[tuple[_Pending, str]]) -> list[_Pending]:
    """The requests of a batch taken from the queue still to compute at ``now``: their
    queue-wait spans end; one whose client left is skipped, one past its deadline goes
    to ``late`` (with why) for the loop to fail."""
    live: list[_Pending] = []
    for p in batch:
        if p.queue_span is not None:
            p.queue_span.end()
        if p.future.done():  # cancelled by its client meanwhile
            continue
        if p.deadline_ns and now >= p.deadline_ns:
            late.append((p, "deadline passed while the request was queued"))
            continue
        live.append(p)
    return live


def _batch_inputs(live: list[_Pending]) -> dict[str, np.ndarray]:
    """The requests' inputs, one after the other along dim 0."""
    if len(live) == 1:
        return live[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in live]) for name in live[0].inputs}


class DynamicBatcher:
    """Gathers concurrent requests for one model version into batches.

    ``max_batch_size`` bounds the rows of a batch; ``max_queue_delay_s`` is how
    long a batch may wait for more rows while a runner slot is free (0: never);
    ``max_queue_size`` bounds waiting requests (503 above it);
    ``max_concurrent_batches`` is how many batches run at once;
    ``priority_levels`` queues (0 or 1: one), ``default_priority_level`` for
    requests without a priority (0: the lowest level); ``model``/``version``
    name spans; ``stats`` is the version's counter (a fresh one when None), which
    receives queue and batch timings. ``run_inline``: what runs a batch on the event
    loop when it is the only work of this version (it may decline; ``run_batch`` then
    runs it). ``run_threaded``: the backend's worker threads, which then start batches
    themselves (``run_batch`` is still what runs a batch that ``run_inline`` declined).
    """

    def __init__(
        self,
        run_batch: BatchRunner,
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 2048,
        max_concurrent_batches: int = 1,
        batched: bool = True,
        priority_levels: int = 0,
        default_priority_level: int = 0,
        model: str = "",
        version: str = "",
        stats: VersionCounter | None = None,
        run_inline: InlineRunner | None = None,
        run_threaded: ThreadedRunner | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1 or max_concurrent_batches < 1 or max_queue_delay_s < 0:
            raise ValueError("max_queue_size and max_concurrent_batches must be >= 1, delay >= 0")
        self._run_batch = run_batch
        self._run_inline = run_inline
        self._threaded = run_threaded
        #: Guards the queues: worker threads take batches from them too.
        self._lock = threading.Lock()
        #: The loop requests are answered on (known from the first submit).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set whenever a worker's batch was answered (``close`` waits on it).
        self._answered: asyncio.Event | None = None
        #: Batches in a row that were all their version had (see ``_alone``).
        self._lone = 0
        self.max_batch_size = max_batch_size if batched else 1
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_concurrent_batches = max_concurrent_batches
        self._batched = batched
        self.priority_levels = max(1, priority_levels)
        if not 0 <= default_priority_level <= self.priority_levels:
            raise ValueError("default_priority_level must be within the priority levels")
        self._default_level = (default_priority_level or self.priority_levels) - 1
        self._queues: list[deque[_Pending]] = [deque() for _ in range(self.priority_levels)]
        self._queued = 0
        self._queued_rows = 0
        #: Requests admitted whose body is still being read or decoded (each holds a place).
        self._admitted = 0
        #: Recent batch compute time (ns, moving average; 0 until a batch ran).
        self._batch_ns = 0
        self._attributes = {"fermion.model": model, "fermion.version": version}
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        #: The deadline sweep's timer and when it is due (``_expire_due``).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_ns = 0
        self._closed = False
        #: Triton-style statistics of this version (shared with its metrics).
        self.stats = (
            stats
            if stats is not None
            else VersionCounter(model, int(version) if version.isdigit() else 0)
        )

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queued

    @property
    def closed(self) -> bool:
        """True once ``close`` was called: new requests are refused."""
        return self._closed

    @property
    def running(self) -> int:
        """Batches being computed now."""
        return self._running

    def _finish_ns(self, rows_ahead: int) -> int:
        """Estimated ns until a request behind ``rows_ahead`` queued rows is computed."""
        busy = self._running >= self.max_concurrent_batches
        batches = rows_ahead // self.max_batch_size + 1 + busy
        return batches * self._batch_ns // self.max_concurrent_batches

    def _overloaded(self, reason: str) -> Overloaded:
        self.stats.rejected += 1
        drain_s = self._finish_ns(self._queued_rows + self._admitted) / 1e9
        return Overloaded(f"{reason}; retry later", retry_after_s=max(1.0, drain_s))

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet queued (their bodies are being read or decoded)."""
        return self._admitted

    def admit(self, deadline_ns: int | None = None) -> None:
        """Take a place in the queue for a request whose body is not read yet, or refuse it.

        The place counts against ``max_queue_size`` from now on, so the requests being
        read and decoded are bounded too; ``submit(..., admitted=True)`` takes it over,
        ``release`` gives it back. Refused (503, Overloaded): a full queue (once the
        requests at its head that can no longer meet their deadlines are dropped), or,
        with ``deadline_ns``, a queue whose work would outlast the deadline.
        """
        self.check_admission(deadline_ns)
        self._admitted += 1

    def release(self) -> None:
        """Give back the place of an admitted request that will not be submitted."""
        self._admitted -= 1

    def check_admission(self, deadline_ns: int | None = None) -> None:
        """What ``admit`` checks, without taking a place."""
        if self._closed:
            raise ModelNotReady("model version is unloading")
        now = time.perf_counter_ns()
        if self._queued + self._admitted >= self.max_queue_size:
            self._drop_hopeless(now)
            if self._queued + self._admitted >= self.max_queue_size:
                raise self._overloaded(f"queue full ({self.max_queue_size} waiting requests)")
        if deadline_ns is not None and self._batch_ns:
            finish = self._finish_ns(self._queued_rows + self._admitted)
            if now + finish > deadline_ns:
                raise self._overloaded(
                    f"the queue holds about {finish / 1e6:.0f} ms of work, past this "
                    f"request's deadline in {max(0, deadline_ns - now) / 1e6:.0f} ms"
                )

    def _drop_hopeless(self, now: int) -> None:
        """Fail (504) the queue heads whose deadlines pass before a batch could compute them."""
        with self._lock:
            hopeless = self._pop_hopeless(now)
        self._fail_hopeless(hopeless)

    def _pop_hopeless(self, now: int) -> list[_Pending]:
        """Take the queue heads that cannot be computed by their deadlines (lock held)."""
        soonest = now + self._batch_ns
        hopeless: list[_Pending] = []
        for queue in self._queues:
            while queue and 0 < queue[0].deadline_ns < soonest:
                pending = queue[0]
                self._unqueue_locked(pending)
                hopeless.append(pending)
        return hopeless

    def _fail_hopeless(self, hopeless: list[_Pending]) -> None:
        for pending in hopeless:
            self.stats.expired += 1
            if not pending.future.done():
                pending.future.set_exception(
                    DeadlineExceeded("deadline would pass before the request was computed")
                )

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        *,
        deadline_ns: int | None = None,
        priority: int = 0,
        admitted: bool = False,
    ) -> dict[str, np.ndarray]:
        """Queue one request of ``rows`` rows and wait for its outputs.

        ``deadline_ns`` (``time.perf_counter_ns``): past it, a request still queued
        is dropped with DeadlineExceeded. ``priority``: 1 is the highest level, 0
        the default level. ``admitted``: the request holds a place taken by ``admit``.
        """
        if admitted:
            self._admitted -= 1  # the place becomes this request's queue slot (or is lost)
        if self._closed:
            raise ModelNotReady("model version is unloading")
        if rows > self.max_batch_size:
            raise InvalidInput(
                f"batch of {rows} is over this model's max batch size {self.max_batch_size}"
            )
        level = 0
        if self.priority_levels > 1:
            if priority > self.priority_levels:
                raise InvalidInput(
                    f"priority {priority} is over this model's {self.priority_levels} levels"
                )
            level = priority - 1 if priority else self._default_level
        now = time.perf_counter_ns()
        if not admitted and self._queued + self._admitted >= self.max_queue_size:
            self._drop_hopeless(now)
            if self._queued + self._admitted >= self.max_queue_size:
                raise self._overloaded(f"queue full ({self.max_queue_size} waiting requests)")
        loop = asyncio.get_running_loop()
        self._loop = loop
        if deadline_ns is not None and deadline_ns <= now:
            self.stats.expired += 1
            raise DeadlineExceeded("deadline passed before the request was queued")
        shape_key = tuple(a.shape[1:] for a in inputs.values()) if self._batched else ()
        pending = _Pending(inputs, rows, shape_key, loop.create_future(), now, level)
        recording = _tracing.recording_span()
        if recording is not None:
            pending.span = recording[1]
            pending.queue_span = _tracing.start_child(*recording, "fermion.queue", self._attributes)
        if deadline_ns is not None:
            pending.deadline_ns = deadline_ns
            if self._sweep is None or deadline_ns < self._sweep_ns:
                self._arm_sweep(loop, deadline_ns, now)
        with self._lock:
            self._queues[level].append(pending)
            pending.queued = True
            self._queued += 1
            self._queued_rows += rows
        self._dispatch()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client went away: never compute a request nobody waits for.
            self._unqueue(pending)
            raise

    def _unqueue(self, pending: _Pending) -> bool:
        """Remove a request still waiting in its queue; False when it was already taken."""
        with self._lock:
            return self._unqueue_locked(pending)

    def _unqueue_locked(self, pending: _Pending) -> bool:
        if not pending.queued:
            return False
        # (A request not in the deque would cost its repr in remove's ValueError.)
        self._queues[pending.level].remove(pending)
        self._left_queue_locked(pending)
        return True

    def _left_queue_locked(self, pending: _Pending) -> None:
        """Count out a request just taken out of its queue (not into a batch)."""
        pending.queued = False
        self._queued -= 1
        self._queued_rows -= pending.rows
        if pending.queue_span is not None:
            pending.queue_span.end()

    # Deadlines of queued requests: one timer for the whole queue, the sweep. It is due
    # no later than the soonest deadline queued (a request with a sooner one moves it);
    # it fails the queued requests whose deadlines have come and re-arms for the soonest
    # left. Requests usually leave the queue long before their deadlines, and with one
    # timeout for all a later arrival has a later deadline, so the timer rarely moves: a
    # timer per request (armed, then cancelled) cost every request on the loop. (A
    # request taken into a batch is checked again just before it runs.)

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, due_ns: int, now: int) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_ns = due_ns
        self._sweep = loop.call_later((due_ns - now) / 1e9, self._expire_due)

    def _expire_due(self) -> None:
        """The sweep: fail the queued requests whose deadlines have come; re-arm."""
        self._sweep = None
        now = time.perf_counter_ns()
        # The loop's timers fire to the millisecond: a deadline within it has come.
        due = now + _SWEEP_SLACK_NS
        expired: list[_Pending] = []
        soonest = 0
        with self._lock:
            for level, queue in enumerate(self._queues):
                come = [p for p in queue if 0 < p.deadline_ns <= due]
                if come:
                    queue = self._queues[level] = deque(
                        p for p in queue if not 0 < p.deadline_ns <= due
                    )
                    expired += come
                for p in queue:
                    if p.deadline_ns and (not soonest or p.deadline_ns < soonest):
                        soonest = p.deadline_ns
            for p in expired:
                self._left_queue_locked(p)
        for p in expired:
            if not p.future.done():
                self.stats.expired += 1
                p.future.set_exception(
                    DeadlineExceeded("deadline passed while the request was queued")
                )
        if soonest:
            self._arm_sweep(self._loop or asyncio.get_running_loop(), soonest, now)

    def _dispatch(self) -> None:
        """Start batches while there are requests and free runner slots (on the loop)."""
        # Only the loop adds requests and changes ``_running`` (a worker keeps its slot for
        # the batch it takes, and gives it back through ``_finish``): nothing to start here
        # is nothing to start under the lock either.
        while self._queued and self._running < self.max_concurrent_batches:
            inline: bool | None = None
            with self._lock:
                if not self._queued:  # a worker took them meanwhile
                    return
                if self.max_queue_delay_s > 0 and self._should_wait():
                    return
                hopeless = self._pop_hopeless(time.perf_counter_ns()) if self._batch_ns else []
                batch = self._take_locked() if self._queued else []
                if batch:
                    self._running += 1
                    if self._threaded is not None:
                        inline = self._run_inline is not None and self._alone(len(batch))
            if hopeless:
                self._fail_hopeless(hopeless)
            if not batch:
                return
            if self._threaded is not None and not inline:
                self._start(batch)
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch, inline))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _should_wait(self) -> bool:
        """On the loop: whether the queue gathers more rows (a timer then ends its window)."""
        left = self._wait_left_s(time.perf_counter_ns())
        if left <= 0:
            return False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(left, self._on_timer)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take_locked(self) -> list[_Pending]:
        """The head of the first non-empty level, then what fits, level by level (lock held;
        the queue is not empty)."""
        first = next(i for i, q in enumerate(self._queues) if q)
        head = self._queues[first].popleft()
        batch = [head]
        rows = head.rows
        if self._batched:
            for i in range(first, self.priority_levels):
                queue = self._queues[i]
                if rows >= self.max_batch_size:
                    break
                if not queue:
                    continue
                keep: deque[_Pending] = deque()
                while queue and rows < self.max_batch_size:
                    p = queue.popleft()
                    if p.shape_key == head.shape_key and rows + p.rows <= self.max_batch_size:
                        batch.append(p)
                        rows += p.rows
                    else:
                        keep.append(p)
                keep.extend(queue)
                self._queues[i] = keep
        for p in batch:
            p.queued = False
        self._queued -= len(batch)
        self._queued_rows -= rows
        return batch

    async def _run(self, batch: list[_Pending], inline: bool | None = None) -> None:
        """Compute ``batch`` through ``run_batch`` (``inline``: through ``run_inline`` first;
        None: decide here)."""
        started = time.perf_counter_ns()
        rows = 0
        spans: tuple[Any, Any] | None = None
        try:
            late: list[tuple[_Pending, str]] = []
            live = _live(batch, started, late)
            self._expire_all(late)
            if not live:
                return
            rows = sum(p.rows for p in live)
            inputs = _batch_inputs(live)
            spans = self._batch_spans(live, rows)
            # Each batch runs in its own task: setting the variable here stays here.
            deadlines = [p.deadline_ns for p in live]  # 0: no deadline
            batch_deadline_ns.set(None if 0 in deadlines else max(deadlines))
            try:
                # The executor-run span is current while the backend runs the batch.
                token = _tracing.make_current(spans[1]) if spans is not None else None
                try:
                    ran = None
                    if inline is None:
                        inline = self._run_inline is not None and self._alone(len(live))
                    if inline and self._run_inline is not None:
                        ran = self._run_inline(inputs)
                    outputs = await self._run_batch(inputs) if ran is None else ran
                finally:
                    if spans is not None and token is not None:
                        _tracing.detach(token)
                        spans[1].end()
                parts = self._split(outputs, live, rows)
            except Exception as e:
                if isinstance(e, InvalidInput) and len(live) > 1:
                    # One request's values were refused (an upstream's own check): each
                    # request alone, so that the others are still answered.
                    await self._run_each(live)
                    return
                error = _failure(e)
                if spans is not None:
                    spans[0].record_exception(e)
                self._record(live, rows, started, ok=False)
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(error)
                return
            self._record(live, rows, started, ok=True)
            for p, out in zip(live, parts, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
        finally:
            if spans is not None:
                spans[0].end()
            self._running -= 1
            self._dispatch()

    # Batches computed on the backend's worker threads (``run_threaded``).

    def _start(self, batch: list[_Pending]) -> None:
        """Hand ``batch`` (its slot counted in ``_running``) to a worker thread, from any
        thread. When the workers are gone, its requests fail (on the loop)."""
        assert self._threaded is not None
        try:
            self._threaded.submit(functools.partial(self._work, batch))
        except Exception as e:
            failed = _Ran(release=True)
            error = e if isinstance(e, FermionError) else ModelNotReady(f"no worker: {e}")
            failed.outcomes.extend((p, error) for p in batch)
            self._post(failed)

    def _work(self, batch: list[_Pending]) -> None:
        """On a worker thread: compute ``batch``, take the next one while the queue holds
        one (this slot stays taken), hand both to the loop and the workers."""
        try:
            ran = self._compute(batch)
        except Exception as e:  # _compute catches the model's errors; this is a bug
            log.exception("batch of %s failed outside its model", self._attributes)
            ran = _Ran()
            ran.outcomes.extend((p, InferenceFailed(f"inference failed: {e}")) for p in batch)
        now = time.perf_counter_ns()
        with self._lock:
            following: list[_Pending] = []
            if self._queued and not (self.max_queue_delay_s > 0 and self._wait_left_s(now) > 0):
                hopeless = self._pop_hopeless(now) if self._batch_ns else []
                ran.expired.extend(
                    (p, "deadline would pass before the request was computed") for p in hopeless
                )
                following = self._take_locked() if self._queued else []
            if following:
                self._lone = 0
            else:
                ran.release = True
        self._post(ran)
        if following:
            self._start(following)

    def _post(self, ran: _Ran) -> None:
        """Hand what a worker did to the loop, which answers it (``_finish``)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._finish, ran)
        except RuntimeError:  # the loop is closed: nobody waits for these answers any more
            log.warning("batch of %s finished after its event loop closed", self._attributes)

    def _expire_all(self, expired: list[tuple[_Pending, str]]) -> None:
        """On the loop: fail (504) and count requests whose deadlines passed, with why."""
        for p, message in expired:
            self.stats.expired += 1
            if not p.future.done():
                p.future.set_exception(DeadlineExceeded(message))

    def _wait_left_s(self, now: int) -> float:
        """Seconds the queue (not empty) still gathers rows for its next batch: 0 once a
        batch's worth waits, the oldest request waited ``max_queue_delay_s``, or the
        batcher closes (lock held)."""
        if self._closed or self._queued_rows >= self.max_batch_size:
            return 0.0
        oldest = min(q[0].enqueued_ns for q in self._queues if q)
        return max(0.0, self.max_queue_delay_s - (now - oldest) / 1e9)

    def _compute(self, batch: list[_Pending]) -> _Ran:
        """Compute the live requests of ``batch`` on this thread (a worker's)."""
        ran = _Ran()
        started = time.perf_counter_ns()
        live = _live(batch, started, ran.expired)
        if live:
            self._compute_live(live, started, ran)
        return ran

    def _compute_live(self, live: list[_Pending], started: int, ran: _Ran) -> None:
        assert self._threaded is not None
        rows = sum(p.rows for p in live)
        inputs = _batch_inputs(live)
        spans = self._batch_spans(live, rows)
        try:
            try:
                outputs = self._threaded.run(inputs)
            finally:
                if spans is not None:
                    spans[1].end()
            parts = self._split(outputs, live, rows)
        except Exception as e:
            if isinstance(e, InvalidInput) and len(live) > 1:
                # One request's values were refused: each alone, so the others are answered.
                if spans is not None:
                    spans[0].end()
                for p in live:
                    self._compute_live([p], time.perf_counter_ns(), ran)
                return
            error = _failure(e)
            if spans is not None:
                spans[0].record_exception(e)
                spans[0].end()
            ran.records.append((live, rows, started, time.perf_counter_ns(), False))
            ran.outcomes.extend((p, error) for p in live)
            return
        if spans is not None:
            spans[0].end()
        ran.records.append((live, rows, started, time.perf_counter_ns(), True))
        ran.outcomes.extend(zip(live, parts, strict=True))

    def _finish(self, ran: _Ran) -> None:
        """On the loop: answer, fail and count what a worker did; start what can start."""
        self._expire_all(ran.expired)
        for live, rows, started, finished, ok in ran.records:
            self._record(live, rows, started, ok=ok, finished=finished)
        for p, outcome in ran.outcomes:
            if p.future.done():
                continue
            if isinstance(outcome, Exception):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)
        if ran.release:
            self._running -= 1
            if self._answered is not None:
                self._answered.set()
        self._dispatch()

    def _batch_spans(self, live: list[_Pending], rows: int) -> tuple[Any, Any] | None:
        """The batch span and its executor-run span, when a request of it is traced."""
        tracer = _tracing.current_tracer()
        traced = [p.span for p in live if p.span is not None] if tracer is not None else []
        if tracer is None or not traced:
            return None
        attributes = {**self._attributes, "fermion.batch.rows": rows}
        attributes["fermion.batch.requests"] = len(live)
        return _tracing.start_batch_spans(tracer, traced, attributes)

    def _alone(self, requests: int) -> bool:
        """Count this batch of ``requests`` into the streak; True when this version's
        traffic is one request at a time: the batch is one request and all the version has
        (none queued or decoding), and so were the last ``_LONE_STREAK`` batches. (A busy
        version is alone for a moment too, between rounds of answers; run inline then, it
        would keep the next round's reads waiting on the model.)"""
        if requests == 1 and self._running == 1 and not self._queued and not self._admitted:
            self._lone += 1
            return self._lone > _LONE_STREAK
        self._lone = 0
        return False

    async def _run_each(self, live: list[_Pending]) -> None:
        """Compute each request of a refused batch on its own; fail only the refused ones."""
        for p in live:
            started = time.perf_counter_ns()
            try:
                outputs = await self._run_batch(p.inputs)
            except Exception as e:
                self._record([p], p.rows, started, ok=False)
                if not p.future.done():
                    p.future.set_exception(_failure(e))
                continue
            self._record([p], p.rows, started, ok=True)
            if not p.future.done():
                p.future.set_result(outputs)

    def _split(
        self, outputs: dict[str, np.ndarray], live: list[_Pending], rows: int
    ) -> list[dict[str, np.ndarray]]:
        if len(live) == 1:
            return [outputs]
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise InferenceFailed(
                    f"model returned {name} with shape {list(arr.shape)} for a batch of {rows} rows"
                )
        parts: list[dict[str, np.ndarray]] = []
        offset = 0
        for p in live:
            end = offset + p.rows
            parts.append({name: arr[offset:end] for name, arr in outputs.items()})
            offset = end
        return parts

    def _record(
        self, live: list[_Pending], rows: int, started: int, *, ok: bool, finished: int = 0
    ) -> None:
        took = (finished or time.perf_counter_ns()) - started
        self._batch_ns = took if not self._batch_ns else (3 * self._batch_ns + took) // 4
        self.stats.batch_done([p.enqueued_ns for p in live], started, rows, ok=ok)

    async def close(self) -> None:
        """Stop taking requests; finish every request already queued or running."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queued or self._tasks or self._running:
            self._dispatch()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            elif self._running:  # on worker threads: a slot given back sets the event
                if self._answered is None:
                    self._answered = asyncio.Event()
                self._answered.clear()
                await self._answered.wait()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
