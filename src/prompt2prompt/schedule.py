"""Which denoising steps an edit applies to: fractions, (start, end) pairs, or per word.

Defaults from the Prompt-to-Prompt paper's notebooks: cross-attention replaced for the first 80% of steps,
self-attention for the first 40%.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import PromptError
from .tokens import PromptTokens

Span = float | tuple[float, float]  # a fraction f means (0, f)


def step_range(span: Span, steps: int) -> tuple[int, int]:
    """[start, end) steps of a fraction or a (start, end) pair of fractions of the steps."""
    start, end = (0.0, float(span)) if isinstance(span, (int, float)) else (float(span[0]), float(span[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise PromptError(f"a step span must be a fraction in [0, 1] or a pair 0 <= start <= end <= 1, got {span}")
    return int(start * steps), int(end * steps)


def cross_schedule(spans: Span | Mapping[str, Span], targets: list[PromptTokens], steps: int) -> torch.Tensor:
    """(steps, targets, tokens) 0/1: whether each target token takes the source's cross-attention at each step.

    spans: one span for every token, or a mapping {"default": span, word: span, ...} whose words are looked up in
    each target prompt (a word missing from a target is an error that names it, unless another target has it).
    """
    length = targets[0].length
    per_word = dict(spans) if isinstance(spans, Mapping) else {"default": spans}
    default = per_word.pop("default", 1.0)
    alpha = torch.zeros(steps, len(targets), length)
    a, b = step_range(default, steps)
    alpha[a:b] = 1.0
    for word, span in per_word.items():
        a, b = step_range(span, steps)
        found = False
        for k, target in enumerate(targets):
            matches = target.find(word)
            if not matches:
                continue
            found = True
            positions = [t for m in matches for t in m]
            alpha[:, k, positions] = 0.0
            alpha[a:b, k, positions] = 1.0
        if not found:
            raise PromptError(
                f"the per-word step word {word!r} is in no edited prompt; their words are: "
                + " | ".join(", ".join(t.word_list()) for t in targets)
            )
    return alpha


def parse_spans(text: str) -> Span | dict[str, Span]:
    """'0.8', '0.2,0.8', or 'default=1.0,lion=0.4' (a pair per word as lion=0.1:0.4) from the command line."""
    text = text.strip()
    try:
        if "=" not in text:
            parts = [float(x) for x in text.split(",")]
            return parts[0] if len(parts) == 1 else (parts[0], parts[1])
        out: dict[str, Span] = {}
        for item in text.split(","):
            word, value = item.split("=")
            nums = [float(x) for x in value.split(":")]
            out[word.strip()] = nums[0] if len(nums) == 1 else (nums[0], nums[1])
        return out
    except ValueError as e:
        raise PromptError(
            f"expected a step span like 0.8, 0.2,0.8 or default=1.0,lion=0.4 (pairs as lion=0.1:0.4), got {text!r}"
        ) from e
