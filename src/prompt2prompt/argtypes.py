"""Argument types for the command lines (`p2p`, `p2p sweep`): a bad value is argparse's one-line error, exit 2."""

from __future__ import annotations

import argparse
import math


def whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


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
