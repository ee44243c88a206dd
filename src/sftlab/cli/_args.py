"""Argument types and flags the subcommands share: a bad value is an argparse usage error naming the option."""

from __future__ import annotations

import argparse
import math


def _number(s: str, kind: type) -> float:
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a{'n integer' if kind is int else ' number'}"
        ) from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def positive_int(s: str) -> int:
    v = int(_number(s, int))
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {s})")
    return v


def non_negative_float(s: str) -> float:
    v = _number(s, float)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {s})")
    return v


def probability(s: str) -> float:
    """A nucleus-sampling mass: in (0, 1]."""
    v = _number(s, float)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {s})")
    return v


def add_trust_remote_code(p: argparse.ArgumentParser, what: str) -> None:
    """The only switch for remote code: a config or run directory cannot turn it on (config/load.py)."""
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help=f"run the model's own Python code (auto_map) from {what}; off unless given here, whatever a config "
        "or run directory says",
    )
