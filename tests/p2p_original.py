"""A small re-statement of the Prompt-to-Prompt code's formulas (google/prompt-to-prompt: seq_aligner.py and the
prompt-to-prompt_stable / null_text_w_ptp notebooks), written out independently of the library for the reference-mode
tests: whitespace words, per-token decoded lengths, traceback matrices, tables with steps + 1 rows."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def word_inds(text: str, word: str | int, tokenizer) -> list[int]:
    """Token positions of a whitespace-separated word (by text or index), walking decoded token lengths."""
    split = text.split(" ")
    places = [i for i, w in enumerate(split) if w == word] if isinstance(word, str) else [word]
    out = []
    if places:
        pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
        length, pointer = 0, 0
        for i, piece in enumerate(pieces):
            length += len(piece)
            if pointer in places:
                out.append(i + 1)
            if length >= len(split[pointer]):
                pointer, length = pointer + 1, 0
    return out


def replacement_mapper(x: str, y: str, tokenizer, max_len: int = 77) -> torch.Tensor:
    wx, wy = x.split(" "), y.split(" ")
    swapped = [i for i in range(len(wy)) if wy[i] != wx[i]]
    src = [word_inds(x, i, tokenizer) for i in swapped]
    tgt = [word_inds(y, i, tokenizer) for i in swapped]
    mapper = np.zeros((max_len, max_len))
    i = j = k = 0
    while i < max_len and j < max_len:
        if k < len(src) and src[k][0] == i:
            if len(src[k]) == len(tgt[k]):
                mapper[src[k], tgt[k]] = 1
            else:
                for t in tgt[k]:
                    mapper[src[k], t] = 1 / len(tgt[k])
            i, j, k = i + len(src[k]), j + len(tgt[k]), k + 1
        elif k < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(mapper).float()


def refinement_mapper(x: str, y: str, tokenizer, max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = tokenizer.encode(x), tokenizer.encode(y)
    score = np.zeros((len(xs) + 1, len(ys) + 1), dtype=np.int32)
    trace = np.zeros((len(xs) + 1, len(ys) + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, len(xs) + 1):
        for j in range(1, len(ys) + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if xs[i - 1] == ys[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    pairs = []
    i, j = len(xs), len(ys)
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1], dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[: base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(ys) + torch.arange(max_len - len(ys))
    return mapper, alphas


def time_word_alpha(prompts: list[str], steps: int, spans, tokenizer, max_len: int = 77) -> torch.Tensor:
    """(steps + 1, targets, max_len): the notebook's cross-replacement table."""
    spans = dict(spans) if isinstance(spans, dict) else {"default_": spans}
    spans.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(steps + 1, len(prompts) - 1, max_len)

    def update(bounds, k, inds=None):
        bounds = (0, bounds) if isinstance(bounds, float) else bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        inds = torch.arange(max_len) if inds is None else inds
        alpha[:start, k, inds] = 0
        alpha[start:end, k, inds] = 1
        alpha[end:, k, inds] = 0

    for k in range(len(prompts) - 1):
        update(spans["default_"], k)
    for word, bounds in spans.items():
        if word != "default_":
            for k in range(len(prompts) - 1):
                inds = word_inds(prompts[k + 1], word, tokenizer)
                if inds:
                    update(bounds, k, inds)
    return alpha


def replace_cross(base: torch.Tensor, edited: torch.Tensor, mapper: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """base (heads, q, 77), edited (targets, heads, q, 77), mapper (targets, 77, 77), alpha (targets, 77)."""
    new = torch.einsum("hpw,bwn->bhpn", base, mapper)
    a = alpha[:, None, None, :]
    return new * a + (1 - a) * edited


def refine_cross(base, edited, mapper, alphas, alpha):
    """mapper/alphas (targets, 77) from refinement_mapper."""
    new = base[:, :, mapper].permute(2, 0, 1, 3)
    new = new * alphas[:, None, None, :] + edited * (1 - alphas[:, None, None, :])
    a = alpha[:, None, None, :]
    return new * a + (1 - a) * edited


def blend_mask(maps: torch.Tensor, alpha_layers: torch.Tensor, latent_size, threshold: float = 0.3,
               sub_layers: torch.Tensor | None = None) -> torch.Tensor:
    """maps (prompts, layers*heads, 1, 16, 16, 77) summed over steps; alpha_layers (prompts, 1, 1, 1, 1, 77)."""
    def mask_of(alpha, pool):
        m = (maps * alpha).sum(-1).mean(1)
        if pool:
            m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=latent_size)
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        m = m.gt(threshold)
        return m[:1] + m

    mask = mask_of(alpha_layers, True)
    if sub_layers is not None:
        mask = mask * ~mask_of(sub_layers, False)
    return mask
