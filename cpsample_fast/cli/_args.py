"""argparse ``type=`` converters: a bad value becomes one line naming the option (exit 2).

argparse prefixes the message with ``argument --name:``; the converters only say what was
expected and what was given, e.g. ``argument --scale: must be a finite number >= 0, got inf``.
"""

from __future__ import annotations

import argparse
import math

from ..constants import SEED_LIMIT


def _int(text: str) -> int:
    try:
        return int(text, 0) if text.strip().lower().startswith(("0x", "0b", "0o")) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def int_at_least(lo: int):
    """``type=`` for an integer ``>= lo``."""

    def convert(text: str) -> int:
        value = _int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    convert.__name__ = f"int>={lo}"
    return convert


def seed(text: str) -> int:
    """``type=`` for a seed in ``[0, 2**64)``."""
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {value}")
    return value


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """``type=`` for a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        bad = not math.isfinite(value)
        if lo is not None:
            bad = bad or (value <= lo if lo_open else value < lo)
        if hi is not None:
            bad = bad or value > hi
        if bad:
            rng = "a finite number"
            if lo is not None and hi is not None:
                rng += f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            elif lo is not None:
                rng += f" {'>' if lo_open else '>='} {lo:g}"
            elif hi is not None:
                rng += f" <= {hi:g}"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return value

    convert.__name__ = "finite_float"
    return convert


def options(args: argparse.Namespace, *names: str) -> dict:
    """``{name: args.<name>}`` for each of ``names``: a subcommand hands its parsed options to
    a library function by keyword (``run(**options(args, "batch", "steps"))``) instead of
    spelling ``batch=args.batch`` once per option."""
    return {name: getattr(args, name) for name in names}
