"""Token correspondences between a source prompt and an edited one, the heart of Prompt-to-Prompt.

- `replace_mapper`: prompts with the same words but some swapped. A (tokens, tokens) matrix M with
  new[..., t] = sum_s source[..., s] * M[s, t]; a swapped word that tokenises differently shares the source word's
  attention equally among its target tokens (as in the p2p paper's code).
- `refine_alignment`: prompts that add words. A global (Needleman-Wunsch) alignment of the two token sequences; each
  target token either takes the attention of the source token it aligns with or, if new, keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PromptError
from .tokens import PromptTokens


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def _joint_mapper(mapper, source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """A joint sequence's mapper: each part's own, on the diagonal (an MM-DiT's encoders never mix positions)."""
    out = torch.zeros(source.length, target.length)
    for (_, offset, s), (_, _, t) in zip(source.parts, target.parts):
        # a part without tokens (SD3's T5 part when the pipeline has no T5: zeros) maps position to position
        out[offset : offset + s.length, offset : offset + t.length] = mapper(s, t) if s.tokens else torch.eye(s.length)
    return out


def _joint_alignment(align, source: PromptTokens, target: PromptTokens) -> Alignment:
    index, weight = torch.zeros(target.length, dtype=torch.long), torch.zeros(target.length)
    for (_, offset, s), (_, _, t) in zip(source.parts, target.parts):
        part = align(s, t) if s.tokens else Alignment(torch.arange(t.length), torch.ones(t.length))
        index[offset : offset + t.length] = part.index + offset
        weight[offset : offset + t.length] = part.weight
    return Alignment(index, weight)


def _head(source: PromptTokens, target: PromptTokens) -> int:
    """Positions before the prompts' own tokens (the start token, a chat template's opening): the same in both."""
    if source.head != target.head:
        raise PromptError(f"the prompts' templates differ before the prompt ({source.head} and {target.head} tokens)")
    return source.head


def replace_mapper(source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """(length, length) float matrix mapping source token positions to target token positions."""
    if source.parts:
        return _joint_mapper(replace_mapper, source, target)
    if len(source.words) != len(target.words):
        src, tgt = source.word_list(), target.word_list()
        kept = align_sequences(src, tgt)
        extra = [w for j, w in enumerate(tgt) if j not in {b for _, b in kept}]
        missing = [w for i, w in enumerate(src) if i not in {a for a, _ in kept}]
        raise PromptError(
            f"a word swap needs prompts of the same number of words: {source.prompt!r} has {len(src)}, "
            f"{target.prompt!r} has {len(tgt)} (unmatched: {', '.join(map(repr, extra + missing))}); "
            "use refine (--mode refine) for prompts that add words"
        )
    n = source.length
    mapper = torch.zeros(n, n)
    head = _head(source, target)
    mapper[range(head), range(head)] = 1.0  # start token (a template's opening)
    for ws, wt in zip(source.words, target.words):
        if len(ws.tokens) == len(wt.tokens):
            mapper[list(ws.tokens), list(wt.tokens)] = 1.0  # token by token
        else:  # the source word's attention, shared equally among the target word's tokens
            for t in wt.tokens:
                mapper[list(ws.tokens), t] = 1.0 / len(wt.tokens)
    # end token and padding, in order; if the target's tail is longer, its last positions reuse the last source one
    for k in range(n - target.end):
        mapper[min(source.end + k, n - 1), target.end + k] = 1.0
    return mapper


@dataclass(frozen=True)
class Alignment:
    """For each target position: the source position it takes attention from, and whether it does (1) or not (0)."""

    index: torch.Tensor  # (length,) long: source position (0 where the token is new)
    weight: torch.Tensor  # (length,) float: 1 for aligned tokens, 0 for new ones

    def pairs(self) -> list[tuple[int, int]]:
        return [(int(s), t) for t, (s, w) in enumerate(zip(self.index, self.weight)) if w > 0]


def align_sequences(a: list[str], b: list[str], match: int = 1, mismatch: int = -1, gap: int = 0
                    ) -> list[tuple[int, int]]:
    """Needleman-Wunsch global alignment; returns the (i, j) pairs of equal items that are aligned.

    Ties in the traceback prefer the diagonal, then a gap in a: "a squirrel" aligns with the "a" right before
    "squirrel" in "a painting of a squirrel", not with the first "a".
    """
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (match if _same(a[i - 1], b[j - 1]) else mismatch)
            score[i][j] = max(diag, score[i - 1][j] + gap, score[i][j - 1] + gap)
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        same = _same(a[i - 1], b[j - 1])
        if score[i][j] == score[i - 1][j - 1] + (match if same else mismatch):
            if same:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i][j - 1] + gap:
            j -= 1
        else:
            i -= 1
    return pairs[::-1]


def refine_alignment(source: PromptTokens, target: PromptTokens) -> Alignment:
    if source.parts:
        return _joint_alignment(refine_alignment, source, target)
    n = target.length
    index = torch.zeros(n, dtype=torch.long)
    weight = torch.zeros(n)
    head = _head(source, target)
    index[:head], weight[:head] = torch.arange(head), 1.0  # start token (a template's opening)
    src_inner, tgt_inner = list(source.tokens[head : source.end]), list(target.tokens[head : target.end])
    for i, j in align_sequences(src_inner, tgt_inner):
        index[j + head], weight[j + head] = i + head, 1.0
    for k in range(n - target.end):  # end token and padding
        index[target.end + k], weight[target.end + k] = min(source.end + k, n - 1), 1.0
    return Alignment(index, weight)


# -- the Prompt-to-Prompt code's own rules (reference mode) -------------------------------------------------------
# Restated from the paper's public code (google/prompt-to-prompt, seq_aligner.py) so that `EditOptions.reference()`
# reproduces its edits exactly; the defaults above differ where the docs say why.


def reference_replace_mapper(source: PromptTokens, target: PromptTokens) -> torch.Tensor:
    """(length, length): the p2p code's replacement mapper (seq_aligner.get_replacement_mapper_).

    The words that differ (compared as written) are mapped token to token, or shared equally when their token counts
    differ; the tokens before and between them one to one in order; after the last swapped word every target position
    j takes source position j, so the end token and padding are not re-aligned when a swap changed the length.
    """
    if source.parts:
        return _joint_mapper(reference_replace_mapper, source, target)
    if len(source.words) != len(target.words):
        replace_mapper(source, target)  # raises the word-count error
    n = source.length
    swaps = [(ws.tokens, wt.tokens) for ws, wt in zip(source.words, target.words) if ws.text != wt.text]
    mapper = torch.zeros(n, n)
    i = j = k = 0
    while i < n and j < n:
        if k < len(swaps) and swaps[k][0][0] == i:
            src, tgt = swaps[k]
            if len(src) == len(tgt):
                mapper[list(src), list(tgt)] = 1.0
            else:
                for t in tgt:
                    mapper[list(src), t] = 1.0 / len(tgt)
            i, j, k = i + len(src), j + len(tgt), k + 1
        elif k < len(swaps):
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1.0
            i, j = i + 1, j + 1
    return mapper


def reference_refine_alignment(source: PromptTokens, target: PromptTokens) -> Alignment:
    """The p2p code's refinement mapper (seq_aligner.get_mapper): a global alignment of the token ids, start and end
    tokens included (gap 0, match 1, mismatch -1), whose traceback prefers a new target token, then a dropped source
    token, then the diagonal. Every target token on the diagonal takes its source token's attention, equal or not;
    positions after the target's end token take the same position of the source."""
    if source.parts:
        return _joint_alignment(reference_refine_alignment, source, target)
    x, y = list(source.ids), list(target.ids)
    if not x or not y:
        raise PromptError("reference refine needs the prompts' token ids (tokenise them with PromptTokens)")
    n = target.length
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # 1: new target token, 2: dropped source token, 3: diagonal
    for j in range(1, len(y) + 1):
        move[0][j] = 1
    for i in range(1, len(x) + 1):
        move[i][0] = 2
        for j in range(1, len(y) + 1):
            new, dropped = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = best = max(new, dropped, diag)
            move[i][j] = 1 if best == new else 2 if best == dropped else 3
    index = torch.arange(n, dtype=torch.long)
    weight = torch.ones(n)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            index[j], weight[j] = i, 1.0
        elif move[i][j] == 1:
            j -= 1
            index[j], weight[j] = 0, 0.0
        else:
            i -= 1
    return Alignment(index, weight)
