"""One duration grammar: what it reads, what it refuses, and every command that takes one."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.cli import main
from serving.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0.5", 0.5),
        (".25", 0.25),
        ("500ms", 0.5),
        ("90s", 90.0),
        ("2m", 120.0),
        ("12h", 43200.0),
        ("30d", 2592000.0),
        ("1.5h", 5400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        (" 15M ", 900.0),
        ("2 s", 2.0),
    ],
)
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "  ", "abc", "10x", "s10", "-5", "-5s", "1m30", "1..5s", "1e3", "inf", "nan"]
)
def test_what_is_not_a_duration_is_refused_with_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*: use a number of seconds or e\.g\."):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0.0h"])
def test_zero_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must be more than zero"):
        parse_duration(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "--name", "x", "--scopes", "read", "--expires-in", "10x"],
        ["rollout", "start", "digits", "--to", "2", "--interval", "10x"],
    ],
)
def test_commands_refuse_a_bad_duration_with_its_message(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "keys":
        argv = [*argv, "--file", str(tmp_path / "keys.json")]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "invalid duration '10x': use a number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "keys.json").exists()


def test_loadtest_refuses_a_zero_duration(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["loadtest", "--model", "digits", "--duration", "0s", "--url", "http://127.0.0.1:9"]
    )
    assert code == 2
    assert "invalid duration '0s': it must be more than zero" in capsys.readouterr().err
