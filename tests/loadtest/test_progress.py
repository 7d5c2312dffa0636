"""The live progress line: in place on a terminal, every few seconds in a log."""

from __future__ import annotations

import io

from loadtest.openloop import Tick
from loadtest.progress import ProgressLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_line_is_rewritten_in_place() -> None:
    out = Terminal()
    line = ProgressLine(out, target=lambda t: 200.0)
    line.tick(Tick(0, sent=200, done=198, errors=2, in_flight=3, latency={1200: 150, 9000: 48}))
    line.tick(Tick(1, sent=200, done=200, latency={1100: 200}))
    line.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 2 and text.endswith("\n")
    first = text.split("\r\033[K")[1]
    assert first.split() == [
        *("1s", "198/s", "(target", "200/s)", "p50", "1.2ms", "p99", "9ms"),
        *("errors", "2", "(1.01%)", "in", "flight", "3"),
    ]
    assert "errors 2 (0.503%)" in text.split("\r\033[K")[2]  # errors so far, of all answers


def test_a_log_gets_a_line_every_few_seconds() -> None:
    out = io.StringIO()
    now = [0.0]
    line = ProgressLine(out, clock=lambda: now[0])
    for second in range(12):
        now[0] = float(second)
        line.tick(Tick(second, sent=10, done=10, latency={1000: 10}))
    lines = out.getvalue().splitlines()
    assert [x.split()[0] for x in lines] == ["1s", "6s", "11s"]
    assert "\r" not in out.getvalue()
