"""argparse ``type=`` converters shared by the command modules."""

from __future__ import annotations

import argparse

from serving.durations import parse_duration

__all__ = ["duration_seconds"]


def duration_seconds(text: str) -> float:
    """``parse_duration`` for argparse: its message, not argparse's generic one, on bad input."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
