"""Argument types for the command lines (`p2p`, `p2p sweep`): a bad value is argparse's one-line error, exit 2."""

from __future__ import annotations

import argparse
import math


def whole(low: int, high: int | None = None, high_is: str | None = None):
    """A whole number >= low (and <= high; high_is says it for people, e.g. "2**63 - 1")."""
    expected = f"a whole number >= {low}" if high is None else f"a whole number from {low} to {high_is or high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected.removeprefix("a ")
    return parse


def seed():
    """A seed: what torch's generators take (`numbers.SEED_MAX`)."""
    from .numbers import SEED_MAX

    return whole(0, SEED_MAX, "2**63 - 1")


def number(low: float | None = None, high: float | None = None, open_low: bool = False, open_high: bool = False):
    lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if open_high else '<='} {high:g}"
    expected = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if open_low else value < low)
        bad |= high is not None and (value >= high if open_high else value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def steps():
    """Denoising steps: 1 to `numbers.MAX_STEPS`."""
    from .numbers import MAX_STEPS

    return whole(1, MAX_STEPS)
