"""Server subprocesses, and what /proc says about them: CPU time, RSS, loaded libraries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MachineCores",
    "MachineTicks",
    "ServerProcess",
    "background_cores",
    "busiest_others",
    "cores_between",
    "cpu_by_process",
    "cpu_seconds",
    "free_port",
    "loaded",
    "machine_ticks",
    "process_tree",
    "rss_bytes",
    "tcp_retransmits",
    "wait_quiet",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One HTTP server run as a subprocess, its output kept in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        base_url: str,
        log_path: Path,
        *,
        ready_path: str = "/v2/health/ready",
        infer_path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.base_url = base_url
        self.log_path = log_path
        #: Answers 200 once the server is ready.
        self.ready_path = ready_path
        #: Where inference requests go, when not the V2 ``/v2/models/{model}/infer``.
        self.infer_path = infer_path
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc.pid

    def start(self) -> None:
        """Start the server; its own process group, so that stopping reaches its children."""
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=None if self._env is None else {**os.environ, **self._env},
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``GET ready_path`` answers 200; raise with the log's tail if not."""
        path = self.ready_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT the server (graceful, without a drain period), then SIGKILL its process
        group if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is None:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        stat = _read(f"/proc/{p}/stat")
        if stat is not None:
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK_TCK


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every living process: ``{pid: (command, seconds)}``."""
    snapshot = {}
    for entry in os.listdir("/proc"):
        stat = _read(f"/proc/{entry}/stat") if entry.isdigit() else None
        if stat is None:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        snapshot[int(entry)] = (name, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return snapshot


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` plus its descendants (shared pages counted once per process)."""
    total = 0
    for p in process_tree(pid):
        for line in (_read(f"/proc/{p}/status") or "").splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def loaded(pid: int, needle: str) -> list[str]:
    """Mapped files of ``pid`` and its descendants whose path contains ``needle``."""
    found: set[str] = set()
    for p in process_tree(pid):
        for line in (_read(f"/proc/{p}/maps") or "").splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and needle in parts[5]:
                found.add(parts[5].strip())
    return sorted(found)


@dataclass(frozen=True)
class MachineTicks:
    """CPU ticks of the whole machine since boot, from /proc/stat, by who used them."""

    #: user + nice + system: time processes ran (guest time is inside user/nice).
    processes: int
    #: irq + softirq: device and network work (loopback TCP) on no process's account.
    interrupts: int
    #: Time the hypervisor gave this VM's CPUs to other guests.
    steal: int
    total: int

    @property
    def busy(self) -> int:
        """Every tick not idle."""
        return self.processes + self.interrupts + self.steal


@dataclass(frozen=True)
class MachineCores:
    """What the machine's CPUs did between two readings, in cores (1.0 = one core)."""

    busy: float
    interrupts: float
    steal: float


def machine_ticks() -> MachineTicks:
    """The machine's CPU ticks so far, split by who used them."""
    fields = [int(v) for v in (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]]
    fields += [0] * (8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return MachineTicks(user + nice + system, irq + softirq, steal, sum(fields[:8]))


def cores_between(before: MachineTicks, after: MachineTicks) -> MachineCores:
    """The machine's CPU use from ``before`` to ``after``, in cores."""
    per_tick = (os.cpu_count() or 1) / max(1, after.total - before.total)
    return MachineCores(
        busy=(after.busy - before.busy) * per_tick,
        interrupts=(after.interrupts - before.interrupts) * per_tick,
        steal=(after.steal - before.steal) * per_tick,
    )


def tcp_retransmits() -> int:
    """TCP segments the kernel retransmitted since boot (all sockets), from /proc/net/snmp.

    On loopback a retransmit means a stall of at least the 200 ms minimum RTO: a cell
    that saw some has its tail shaped by TCP timers, not by the server alone.
    """
    rows = [line.split() for line in (_read("/proc/net/snmp") or "").splitlines()]
    tcp = [row[1:] for row in rows if row and row[0] == "Tcp:"]
    if len(tcp) < 2 or "RetransSegs" not in tcp[0]:
        return 0
    return int(tcp[1][tcp[0].index("RetransSegs")])


def busiest_others(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    server_pid: int,
    wall: float,
) -> list[str]:
    """The processes, other than the server's and this one, that used the most CPU."""
    mine = set(process_tree(server_pid)) | {os.getpid()}
    used = [
        (after[pid][1] - before[pid][1], f"{name}[{pid}]")
        for pid, (name, _) in after.items()
        if pid in before and pid not in mine
    ]
    used.sort(reverse=True)
    return [f"{who} {cpu / wall:.0%}" for cpu, who in used[:3] if cpu / wall >= 0.05]


def background_cores(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over the next ``seconds`` (sleeping meanwhile)."""
    before = machine_ticks()
    time.sleep(seconds)
    return cores_between(before, machine_ticks()).busy


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait up to ``max_wait`` s for other processes to use under ``threshold`` cores.

    Returns the cores they used in the last second.
    """
    deadline = time.monotonic() + max_wait
    background = background_cores()
    while background > threshold and time.monotonic() < deadline:
        background = background_cores()
    return background
