"""Which denoising steps an edit applies to: fractions, (start, end) pairs, or per word.

A fraction is of the denoising loop the pipeline really runs (its step callbacks): 50 iterations for 50 DDIM steps,
19 for 10 Heun steps (a second-order scheduler evaluates the model twice per step but the last). A span f means the
first f of the loop, a pair (a, b) the iterations [int(a * n), int(b * n)).

The Prompt-to-Prompt code builds its cross-attention table with steps + 1 rows (`int(0.8 * 51)` = 40 of 50 steps,
but `int(0.8 * 8)` = 6 of 7): `reference=True` reproduces that; the default is the plain fraction of the loop.
Words are resolved when an edit is set up (errors before any work); the tables are built once the loop length is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import PromptError
from .tokens import PromptTokens

Span = float | tuple[float, float]  # a fraction f means (0, f)


def check_span(span: Span, what: str = "a step span") -> tuple[float, float]:
    """(start, end) of a fraction or a pair, validated: finite, 0 <= start <= end <= 1."""
    try:
        start, end = (0.0, float(span)) if isinstance(span, (int, float)) else (float(span[0]), float(span[1]))
    except (TypeError, ValueError, IndexError):
        raise PromptError(f"{what} must be a fraction or a (start, end) pair of fractions, got {span!r}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end <= 1.0):
        raise PromptError(f"{what} must be a fraction in [0, 1] or a pair 0 <= start <= end <= 1, got {span!r}")
    return start, end


def step_range(span: Span, steps: int, reference: bool = False) -> tuple[int, int]:
    """[start, end) loop iterations of a fraction or a (start, end) pair of fractions of `steps` iterations.

    reference: the p2p code's rule for cross-attention, fractions of steps + 1.
    """
    start, end = check_span(span)
    n = steps + 1 if reference else steps
    return int(start * n), int(end * n)


@dataclass(frozen=True)
class CrossSpans:
    """A cross-attention schedule with its words resolved to token positions in each edited prompt."""

    default: tuple[float, float]
    words: tuple[tuple[tuple[tuple[int, ...], ...], tuple[float, float]], ...]  # (positions per target, span)
    targets: int
    length: int  # tokens per prompt

    def table(self, steps: int, reference: bool = False) -> torch.Tensor:
        """(steps, targets, tokens) 0/1: whether each target token takes the source's cross-attention at each step."""
        alpha = torch.zeros(steps, self.targets, self.length)
        a, b = step_range(self.default, steps, reference)
        alpha[a:b] = 1.0
        for positions, span in self.words:
            a, b = step_range(span, steps, reference)
            for k, pos in enumerate(positions):
                if pos:
                    alpha[:, k, list(pos)] = 0.0
                    alpha[a:b, k, list(pos)] = 1.0
        return alpha


def resolve_cross(spans: Span | Mapping[str, Span], targets: list[PromptTokens]) -> CrossSpans:
    """Validate a schedule: one span for every token, or {"default": span, word: span, ...} whose words are looked
    up in each target prompt (a word missing from a target is an error that names it, unless another target has it)."""
    per_word = dict(spans) if isinstance(spans, Mapping) else {"default": spans}
    default = check_span(per_word.pop("default", 1.0), "the default cross-attention span")
    words = []
    for word, span in per_word.items():
        pair = check_span(span, f"the step span of {word!r}")
        positions = tuple(tuple(t for m in target.find(word) for t in m) for target in targets)
        if not any(positions):
            raise PromptError(
                f"the per-word step word {word!r} is in no edited prompt; their words are: "
                + " | ".join(", ".join(t.word_list()) for t in targets)
            )
        words.append((positions, pair))
    return CrossSpans(default, tuple(words), len(targets), targets[0].length)


def cross_schedule(spans: Span | Mapping[str, Span], targets: list[PromptTokens], steps: int,
                   reference: bool = False) -> torch.Tensor:
    """(steps, targets, tokens) 0/1 table of a schedule (see `resolve_cross`)."""
    return resolve_cross(spans, targets).table(steps, reference)


def parse_spans(text: str) -> Span | dict[str, Span]:
    """'0.8', '0.2,0.8', or 'default=1.0,lion=0.4' (a pair per word as lion=0.1:0.4) from the command line."""
    text = text.strip()
    try:
        if "=" not in text:
            parts = [float(x) for x in text.split(",")]
            if len(parts) > 2:
                raise ValueError(text)
            out = parts[0] if len(parts) == 1 else (parts[0], parts[1])
            check_span(out)
            return out
        out: dict[str, Span] = {}
        for item in text.split(","):
            word, value = item.split("=")
            if word.strip() in out:  # the last would silently win
                raise PromptError(f"{word.strip()!r} has two step spans in {text!r}; expected each word (and "
                                  "default) once")
            nums = [float(x) for x in value.split(":")]
            if len(nums) > 2:
                raise ValueError(text)
            out[word.strip()] = nums[0] if len(nums) == 1 else (nums[0], nums[1])
            check_span(out[word.strip()], f"the step span of {word.strip()!r}")
        return out
    except ValueError as e:
        if isinstance(e, PromptError):
            raise
        raise PromptError(
            f"expected a step span like 0.8, 0.2,0.8 or default=1.0,lion=0.4 (pairs as lion=0.1:0.4), got {text!r}"
        ) from e
