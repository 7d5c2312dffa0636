"""One grammar for durations on the command line and in config: ``500ms``, ``90s``, ``1m30s``.

A duration is a bare number of seconds (``90``, ``0.5``) or one or more
``<number><unit>`` parts (units ``ms``, ``s``, ``m``, ``h``, ``d``, any case), as in
``15m``, ``12h``, ``30d`` or ``1h30m``. It must be more than zero.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_duration"]

_NUMBER: Final = r"(?:\d+(?:\.\d*)?|\.\d+)"
_BARE: Final = re.compile(_NUMBER)
_PART: Final = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d)\s*")
_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_EXAMPLES: Final = "a number of seconds or e.g. 500ms, 90s, 15m, 12h, 30d, 1m30s"


def parse_duration(text: str) -> float:
    """The seconds in ``text`` (e.g. ``"90"``, ``"500ms"``, ``"2m"``, ``"1h30m"``, ``"30d"``).

    Raises ValueError, naming the text and the grammar, for anything else and for zero.
    """
    cleaned = text.strip().lower()
    if _BARE.fullmatch(cleaned):
        seconds = float(cleaned)
    else:
        pos, seconds = 0, 0.0
        for match in _PART.finditer(cleaned):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _SECONDS[match.group(2)]
            pos = match.end()
        if not cleaned or pos != len(cleaned):
            raise ValueError(f"invalid duration {text!r}: use {_EXAMPLES}")
    if not seconds > 0:
        raise ValueError(f"invalid duration {text!r}: it must be more than zero")
    return seconds
