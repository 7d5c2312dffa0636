"""SLOs: parsing, units, verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.slo import evaluate, parse_slos
from loadtest.summary import summarize


def test_parse_units() -> None:
    slos = parse_slos("p99<50ms, p50 <= 2s ,p99.9<800us,errors<0.1%,errors<=0.01,rps>=100,mean<3")
    assert [(s.metric, s.op, s.threshold) for s in slos] == [
        ("p99", "<", 50.0),
        ("p50", "<=", 2000.0),
        ("p99.9", "<", 0.8),
        ("errors", "<", 0.001),
        ("errors", "<=", 0.01),
        ("rps", ">=", 100.0),
        ("mean", "<", 3.0),
    ]
    assert slos[1].text == "p50<=2s"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("p42<5ms", "unknown metric 'p42'"),
        ("errors<5ms", "errors take"),
        ("p99<5%", "latency takes"),
        ("rps>5ms", "rps takes"),
        ("p99=5ms", "invalid SLO"),
        ("p99<fast", "invalid SLO"),
    ],
)
def test_bad_slos_are_named(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_slos(f"p50<1s,{text}")


def test_verdicts(raw: dict[str, Any]) -> None:
    summary = summarize(raw)
    results = evaluate(parse_slos("p99<50ms,errors<0.1%,p99<=100ms,errors<2%,rps>10"), summary)
    assert [r.ok for r in results] == [False, False, True, True, True]
    assert results[0].line() == "MISSED p99<50ms: measured 99ms"
    assert results[1].line() == "MISSED errors<0.1%: measured 0.99%"
    assert results[4].to_dict()["measured_text"].startswith("101.")


def test_nothing_measured_misses_every_slo() -> None:
    summary = summarize({"start": None, "end": None, "seconds": {}})
    (result,) = evaluate(parse_slos("errors<1%"), summary)
    assert not result.ok and result.line() == "MISSED errors<1%: measured no requests"
