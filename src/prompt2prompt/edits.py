"""Prompt-to-Prompt edits: word swap (replace), added words (refine), re-weighting, local blending, step schedules.

One source prompt and several edited prompts run in one batch from one initial latent; the edits touch only the
conditional half (the router hands controllers nothing else). Defaults take the p2p notebooks' values (cross-attention
from the source for 80% of the loop, self-attention for 40%, local-blend threshold 0.3 from 20% on) with the
differences docs/how-it-works.md lists; `EditOptions.reference()` reproduces the original code exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .alignment import reference_refine_alignment, reference_replace_mapper, refine_alignment, replace_mapper
from .errors import NonFiniteError, PromptError
from .families import family_of
from .generation import Generation, GenerationOptions, generate
from .joint import JOINT_PLACES
from .loading import model_name
from .numbers import FACTOR_MAX, check_factor
from .routing import AttentionController, Controllers, RunInfo, Site, denoiser, exclusive
from .schedule import Span, check_span, resolve_cross, step_range
from .tokens import PromptTokens, batch_tokens

MODES = ("auto", "replace", "refine", "reweight")
NOTEBOOKS = {  # the p2p code's notebooks that reference mode reproduces: (self-attention pixel limit, blend start)
    "stable": (16 * 16, 0.0),  # prompt-to-prompt_stable.ipynb: `att_replace.shape[2] <= 16 ** 2`, blends from step 0
    "null-text": (32 * 32, 0.2),  # null_text_w_ptp.ipynb: `<= 32 ** 2`, LocalBlend(start_blend=0.2)
}
POOLED = ("own", "source")
JOINT = ("renormalize", "raw")


@dataclass(frozen=True)
class EditOptions:
    mode: str = "auto"  # auto (replace if the word counts match, else refine), replace, refine, reweight
    cross_steps: Span | Mapping[str, Span] = 0.8  # fraction of the loop whose cross-attention is the source's; per word
    self_steps: Span = 0.4  # fraction of the loop whose self-attention is the source's
    self_max_side: int | None = None  # self-attention replaced at maps this small or smaller; None: latent side / 4
    reweight: tuple[tuple[str, float], ...] = ()  # (word, factor): scale a word's cross-attention (may be negative)
    blend: tuple[str, ...] = ()  # local blend: words whose attention masks the region that may change
    subtract: tuple[str, ...] = ()  # local blend: words whose region must not change
    threshold: float = 0.3  # local blend: mask threshold on the max-normalised attention, in (0, 1)
    blend_start: float = 0.2  # local blend: fraction of the loop before blending starts
    blend_res: int | None = None  # local blend: map side to use; None: the model's map side (16 at SD's 64 latents)
    keep_background: bool = True  # local blend from an inversion: the input's own pixels outside the mask
    feather: int | None = None  # keep_background: pixels over which the edit fades out; None: the autoencoder's factor
    pooled: str = "own"  # SDXL: each prompt's own pooled text embedding, or the source's for every prompt ("source")
    joint: str = "raw"  # MM-DiT: the source's image-to-text block as it is ("raw"), or rescaled to the target's own
    # total text attention ("renormalize"); raw kept more layout on the trained flow model (BENCHMARKS.md)
    exact: str | None = None  # reproduce a notebook of the p2p code exactly: "stable" or "null-text" (see reference())

    def __post_init__(self):
        if self.mode not in MODES:
            raise PromptError(f"unknown edit mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "reweight" and not self.reweight:
            raise PromptError("mode reweight needs at least one word to re-weight (WORD=FACTOR, e.g. circle=2)")
        spans = self.cross_steps if isinstance(self.cross_steps, Mapping) else {"default": self.cross_steps}
        for word, span in spans.items():
            check_span(span, "the cross-attention span" if word == "default" else f"the step span of {word!r}")
        check_span(self.self_steps, "the self-attention span")
        for word, factor in self.reweight:
            check_factor(factor, f"the re-weight factor of {word!r}", error=PromptError)
        words = [word.lower() for word, _ in self.reweight]
        twice = sorted({w for w in words if words.count(w) > 1})
        if twice:  # the last would silently win
            raise PromptError(f"{', '.join(map(repr, twice))} re-weighted twice; expected each word once")
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise PromptError(f"the local-blend threshold must be between 0 and 1 (exclusive), got {self.threshold!r}")
        check_span(self.blend_start, "the local-blend start")
        for name in ("self_max_side", "blend_res"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PromptError(f"{name} must be a positive number of pixels per side or None, got {value!r}")
        if not isinstance(self.keep_background, bool):
            raise PromptError(f"keep_background must be true or false, got {self.keep_background!r}")
        if self.feather is not None and (isinstance(self.feather, bool) or not isinstance(self.feather, int)
                                         or not 0 <= self.feather <= 64):
            raise PromptError(f"feather must be a whole number of pixels from 0 to 64 or None, got {self.feather!r}")
        if self.pooled not in POOLED:
            raise PromptError(f"pooled must be one of {', '.join(POOLED)}, got {self.pooled!r}")
        if self.joint not in JOINT:
            raise PromptError(f"joint must be one of {', '.join(JOINT)}, got {self.joint!r}")
        if self.exact is not None and self.exact not in NOTEBOOKS:
            raise PromptError(f"reference mode reproduces the notebooks {', '.join(NOTEBOOKS)}, got {self.exact!r}")
        if self.subtract and not self.blend:
            raise PromptError("subtract words only make sense with blend words (--blend)")

    @classmethod
    def reference(cls, notebook: str = "stable", **overrides) -> EditOptions:
        """Options that reproduce the Prompt-to-Prompt code's edits exactly (docs/how-it-works.md, "reference mode").

        notebook "stable" (prompt-to-prompt_stable.ipynb): self-attention replaced at maps of at most 16x16 queries,
        local blend from the first step; "null-text" (null_text_w_ptp.ipynb): at most 32x32, blend from 20%.
        """
        if notebook not in NOTEBOOKS:
            raise PromptError(f"reference mode reproduces the notebooks {', '.join(NOTEBOOKS)}, got {notebook!r}")
        return cls(**{"blend_start": NOTEBOOKS[notebook][1], **overrides, "exact": notebook})

    @classmethod
    def from_text(cls, *, mode: str = "auto", cross_steps: str = "0.8", self_steps: str = "0.4",
                  reweight: Sequence[str] = (), blend: Sequence[str] = (), subtract: Sequence[str] = (),
                  reference: str | None = None, blend_start: float | None = None, **fields) -> EditOptions:
        """Options from the words people type (the command line's flags, the page's fields), checked as such:
        cross_steps "0.8", "0.1,0.8" or "default=1.0,lion=0.4"; self_steps "0.4" or "0.1,0.4"; reweight
        ["circle=2", "red=-1"]; reference a notebook name for `reference` (None: the defaults); blend_start None: the
        mode's default. Other fields (threshold, pooled, joint, keep_background, ...) are passed as they are."""
        from .schedule import parse_spans

        factors = []
        for item in reweight:
            word, _, factor = item.partition("=")
            try:
                value = float(factor)
            except ValueError:
                value = None
            if not word or value is None or not math.isfinite(value) or abs(value) > FACTOR_MAX:
                raise PromptError(f"--reweight expects WORD=FACTOR with a finite factor within +-"
                                  f"{FACTOR_MAX:.4g} (float32's range), such as circle=2 or circle=-1, got "
                                  f"{item!r}")
            factors.append((word, value))
        spans = parse_spans(self_steps)
        if isinstance(spans, dict):
            raise PromptError(f"--self-steps takes a fraction or a pair (0.4 or 0.1,0.4), not per word: {self_steps}")
        given = dict(mode=mode, cross_steps=parse_spans(cross_steps), self_steps=spans, reweight=tuple(factors),
                     blend=tuple(blend), subtract=tuple(subtract), **fields)
        if reference:
            return cls.reference(reference, **given, **({} if blend_start is None else {"blend_start": blend_start}))
        return cls(**given, blend_start=cls.blend_start if blend_start is None else blend_start)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["cross_steps"] = dict(self.cross_steps) if isinstance(self.cross_steps, Mapping) else self.cross_steps
        return d


def _word_positions(prompts: list[PromptTokens], words: tuple[str, ...], what: str,
                    per_prompt: bool = False) -> torch.Tensor:
    """(prompts, tokens) 0/1: the positions of the given words in each prompt that has them. Every word must occur.

    per_prompt: the p2p code's pairing, the i-th word belongs to the i-th prompt only (one word per prompt).
    """
    weights = torch.zeros(len(prompts), prompts[0].length)
    if per_prompt:
        if len(words) != len(prompts):
            raise PromptError(f"in reference mode the {what} words pair with the prompts in order (source first), as "
                              f"the p2p code's LocalBlend: expected {len(prompts)} words, got {len(words)}: {words}")
        for k, (p, word) in enumerate(zip(prompts, words)):
            weights[k, list(p.positions(word))] = 1.0
        return weights
    for word in words:
        found = False
        for k, p in enumerate(prompts):
            for match in p.find(word):
                weights[k, list(match)] = 1.0
                found = True
        if not found:
            cut = [k for k, p in enumerate(prompts) if p.cut_off(word)]
            if cut:
                p = prompts[cut[0]]
                raise PromptError(f"the {what} word {word!r} is in the part of prompt {cut[0] + 1} the model never "
                                  f"sees: it is longer than the model's {p.limit()} and is cut before "
                                  f"{p.truncated[:40]!r}")
            shown = " | ".join(repr(p.prompt) if len(p.prompt) <= 80 else repr(p.prompt[:80]) + "..." for p in prompts)
            raise PromptError(f"the {what} word {word!r} is in none of the prompts: {shown}")
    return weights


def _to(t: torch.Tensor | None, run: RunInfo) -> torch.Tensor | None:
    """A table of the edit on the run's device, in float32: the probabilities controllers see are float32."""
    return None if t is None else t.to(run.device, torch.float32)


def _columns(weights: torch.Tensor, run: RunInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompts, tokens) 0/1 word positions -> (the columns any prompt uses, (prompts, 1, 1, columns) their weights or
    None where all are 1), on the run's device, made once per run: a few columns picked cost less than a product over
    every token."""
    columns = weights.amax(0).nonzero()[:, 0]
    picked = weights[:, None, None, columns]  # (prompts, 1, 1, columns)
    # None where every prompt counts every picked column (a word swap's words share their positions)
    return columns.to(run.device), None if bool((picked == 1).all()) else _to(picked, run)


def _accumulate(acc: torch.Tensor | None, probs: torch.Tensor, words: tuple[torch.Tensor, torch.Tensor],
                res: tuple[int, int]) -> torch.Tensor:
    """acc + the head mean of the words' attention per pixel (prompts, h, w), in float32."""
    columns, weights = words
    picked = probs.index_select(-1, columns)  # (prompts, heads, pixels, columns)
    summed = (picked if weights is None else picked * weights).sum((1, 3)).view(-1, *res)  # (prompts, h, w)
    if acc is None:
        return summed.float() / probs.shape[1]
    return acc.add_(summed, alpha=1 / probs.shape[1])


class LocalBlend(AttentionController):
    """After each step from `start` on, reset the edited latents to the source's outside the words' attention mask.

    The mask (p2p paper, Algorithm 1, lines 11-14): the chosen words' cross-attention summed over steps so far,
    averaged over heads and summed over the layers at one map side, 3x3 max-pooled, resized to the latent (nearest),
    divided by its maximum, thresholded; the union of the source's and each edited prompt's mask, minus the subtract
    words' mask (thresholded the same way without the max-pool, as the p2p code).
    """

    def __init__(self, prompts: list[PromptTokens], words: tuple[str, ...], subtract: tuple[str, ...] = (),
                 threshold: float = 0.3, start: float = 0.0, res: int | None = None, per_prompt: bool = False,
                 steps: int = 0):
        self.words = _word_positions(prompts, words, "blend", per_prompt)  # (prompts, tokens)
        self.sub = _word_positions(prompts, subtract, "subtract", per_prompt) if subtract else None
        self._words = self._sub = None  # their columns, on the run's device (`_columns`)
        self.threshold = threshold
        self.start_fraction = check_span(start, "the local-blend start")[1]
        self.res = res
        self.fallback_steps = steps  # the loop length when the pipeline does not tell it (a bare UNet)
        self.start = int(self.start_fraction * steps)  # the first blended loop iteration
        self.side = 0  # the map side read, set for each run
        self.latent_size: tuple[int, int] = (0, 0)
        self.acc: torch.Tensor | None = None  # (prompts, h, w) word attention summed over layers and steps
        self.acc_sub: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (prompts, 1, H, W) the last mask applied (row 0: source)

    def begin(self, run: RunInfo) -> None:
        side = self.res or run.map_side
        if run.sides and side not in run.sides:
            raise PromptError(f"local blend asked for {side}x{side} maps, but this model's cross-attention maps at "
                              f"this size have sides {', '.join(map(str, run.sides))}")
        self.side = side
        self.start = int(self.start_fraction * (run.steps or self.fallback_steps))
        self.latent_size = run.latent_size
        self.acc = self.acc_sub = self.mask = None
        self._words, self._sub = (None if w is None else _columns(w, run) for w in (self.words, self.sub))

    def wants(self, site: Site) -> bool:
        return site.layer.is_cross and max(site.res) == self.side

    def attention(self, probs, site):
        # probs: (prompts, heads, pixels, tokens) -> the words' attention per pixel, head mean, summed over steps
        self.acc = _accumulate(self.acc, probs, self._words, site.res)
        if self._sub is not None:
            self.acc_sub = _accumulate(self.acc_sub, probs, self._sub, site.res)
        return None

    def attention_of(self, row: int, probs, site) -> None:
        """The attention of prompt `row` alone (probs: (1, heads, pixels, tokens)), from a call that holds that prompt
        only (FlowEdit's separate source and target velocity calls), added to its row of the sums."""
        if self.acc is None:
            self.acc = torch.zeros(len(self.words), *site.res, device=probs.device)
            self.acc_sub = None if self._sub is None else torch.zeros_like(self.acc)
        one = slice(row, row + 1)
        for acc, (columns, weights) in ((self.acc, self._words), (self.acc_sub, self._sub or (None, None))):
            if columns is not None:
                _accumulate(acc[one], probs, (columns, None if weights is None else weights[one]), site.res)

    def _mask(self, maps: torch.Tensor, pool: bool = True) -> torch.Tensor:
        maps = maps[:, None]  # (prompts, 1, h, w)
        if pool:
            maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        if tuple(maps.shape[-2:]) != tuple(self.latent_size):
            maps = F.interpolate(maps, size=self.latent_size)  # nearest, as the p2p code
        peak = maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return (maps / peak) > self.threshold

    def step_end(self, step, timestep, latents):
        if step < self.start or self.acc is None:
            return None
        mask = self._mask(self.acc)
        mask = mask[:1] | mask  # union of the source's mask and each prompt's own
        if self.acc_sub is not None:
            keep_out = self._mask(self.acc_sub, pool=False)
            mask = mask & ~(keep_out[:1] | keep_out)
        self.mask = mask
        if latents.ndim == 3:  # packed latents (Flux): (prompts, tokens, channels), tokens in grid order
            mask = mask.flatten(2).transpose(1, 2)  # (prompts, tokens, 1)
        # inside the mask each prompt's own latent, outside the source's (row 0 is the source's either way)
        return torch.where(mask, latents, latents[:1])


class PromptToPrompt(AttentionController):
    """Cross-attention replacement (replace or refine), re-weighting, and self-attention replacement.

    steps: the loop length to use when the pipeline does not tell it (a bare UNet); otherwise every schedule is a
    fraction of the denoising loop the pipeline really runs.
    """

    def __init__(self, prompts: list[PromptTokens], options: EditOptions, steps: int = 0):
        if len(prompts) < 2:
            raise PromptError("an edit needs a source prompt and at least one edited prompt")
        self.options = options
        self.reference = options.exact is not None
        source, targets = prompts[0], prompts[1:]
        mode = options.mode
        if mode == "auto":
            mode = "replace" if all(len(t.words) == len(source.words) for t in targets) else "refine"
        self.mode = "replace" if mode == "reweight" else mode
        if self.mode == "replace":
            mapper = reference_replace_mapper if self.reference else replace_mapper
            self.mapper = torch.stack([mapper(source, t) for t in targets])  # (targets, tokens, tokens)
            # a swap of words with equal token counts (the usual one) maps every token to itself: no product needed
            self.identity = bool((self.mapper == torch.eye(source.length)).all())
        else:
            align = reference_refine_alignment if self.reference else refine_alignment
            aligned = [align(source, t) for t in targets]
            self.index = torch.stack([a.index for a in aligned])  # (targets, tokens)
            self.weight = torch.stack([a.weight for a in aligned])  # (targets, tokens)
        self.spans = resolve_cross(options.cross_steps, targets)
        self.fallback_steps = steps
        self.equalizer = None
        if options.reweight:
            eq = torch.ones(len(targets), source.length)
            for word, factor in options.reweight:
                # reference: the word is looked up in the first edited prompt and scales every one (the p2p code's
                # get_equalizer(prompts[1], ...)); otherwise in each edited prompt that has it
                positions = _word_positions(targets[:1] if self.reference else targets, (word,), "re-weight")
                positions = positions.expand(len(targets), -1) if self.reference else positions
                eq = torch.where(positions > 0, torch.full_like(eq, float(factor)), eq)
            self.equalizer = eq
        self.self_pixels = NOTEBOOKS[options.exact][0] if self.reference else None
        self.joint_renormalize = options.joint == "renormalize"
        self.self_side = 0
        self.alpha = None
        self.cross_active: list[bool] = []
        self.self_range = (0, 0)
        if steps:
            self._tables(steps)

    def _tables(self, steps: int) -> None:
        self.alpha = self.spans.table(steps, self.reference)  # (steps, targets, tokens)
        self.alpha_on = self.alpha > 0  # the same as booleans, for torch.where
        self.cross_active = (self.alpha.flatten(1).amax(1) > 0).tolist()  # per step; plain bools for wants()
        self.cross_whole = (self.alpha.flatten(1).amin(1) > 0).tolist()  # per step: every token takes the source's
        self.self_range = step_range(self.options.self_steps, steps)

    def begin(self, run: RunInfo) -> None:
        self._tables(run.steps or self.fallback_steps)
        self.self_side = self.options.self_max_side or run.self_side
        # moved to the UNet's device once per run, not per layer call
        for name in ("mapper", "weight", "alpha", "equalizer"):
            setattr(self, name, _to(getattr(self, name, None), run))
        self.alpha_on = self.alpha_on.to(run.device)
        if self.mode == "refine":
            self.index = self.index.to(run.device)

    def wants(self, site: Site) -> bool:
        if site.step >= len(self.cross_active):
            return False
        if site.layer.is_cross:
            return self.cross_active[site.step]
        if not self.self_range[0] <= site.step < self.self_range[1]:
            return False
        return site.pixels <= self.self_pixels if self.self_pixels else max(site.res) <= self.self_side

    def attention(self, probs, site):
        # probs: (prompts, heads, queries, keys); row 0 is the source. Written in place (and probs returned) unless
        # autograd needs the original
        base, edited = probs[:1], probs[1:]
        if not site.layer.is_cross:
            return _rows(probs, base, edited, base)
        if self.mode == "replace":
            # (targets or, for the identity, 1 to broadcast, heads, queries, tokens)
            mapped = base if self.identity else torch.matmul(base, self.mapper[:, None])
        else:
            mapped = base[0][:, :, self.index].permute(2, 0, 1, 3)  # (targets, heads, queries, tokens)
            w = self.weight[:, None, None, :]
            mapped = mapped * w + edited * (1 - w)  # new tokens keep their own attention
        if self.joint_renormalize and site.layer.place in JOINT_PLACES:
            # a block of a joint softmax: its rows sum to the query's attention on the text, not to 1. Scale the
            # source's block to the edited prompt's own text mass, so the image-to-image part stays consistent
            own = edited.sum(-1, keepdim=True)  # (targets, heads, queries, 1)
            mapped = mapped * (own / mapped.sum(-1, keepdim=True).clamp_min(1e-12))
        if self.equalizer is not None:
            mapped = mapped * self.equalizer[:, None, None, :]
        if not self.cross_whole[site.step]:  # alpha is 0/1 per token: the source's (mapped) where 1, its own where 0
            mapped = torch.where(self.alpha_on[site.step][:, None, None, :], mapped, edited)
        # a block of a joint softmax comes back new: the joint path moves the output by (new - old) @ V_text and would
        # have to make the old block again (two operations more than the concatenation) had it been overwritten
        return _rows(probs, base, edited, mapped, in_place=site.layer.place not in JOINT_PLACES)


def _rows(probs: torch.Tensor, base: torch.Tensor, edited: torch.Tensor, new: torch.Tensor,
          in_place: bool = True) -> torch.Tensor:
    """probs (its row 0 `base` and rows 1: `edited`, views) with the rows 1: set to `new` (broadcast to their shape):
    in place where asked and autograd allows (the router then keeps probs as it is), else a new tensor."""
    if probs.requires_grad or not in_place:
        return torch.cat([base, new if new.shape == edited.shape else new.expand_as(edited)])
    edited.copy_(new)
    return probs


class LatentTrace(AttentionController):
    """Keeps the latents after every step (for the swap analysis)."""

    def __init__(self):
        self.latents: list[torch.Tensor] = []

    def step_end(self, step, timestep, latents):
        self.latents.append(latents.detach().float().cpu())
        return None


@dataclass
class EditResult:
    prompts: list[PromptTokens]
    controlled: Generation
    vanilla: Generation | None  # the same prompts and seed without control
    settings: dict = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (prompts, 1, h, w) the last local-blend mask
    kept: torch.Tensor | None = None  # (targets, 1, H, W) where the input's background was kept: the edit's weight
    # per pixel (1 inside the mask, 0 where the pixel is the input's; `background.keep_background`)

    def _repr_png_(self) -> bytes:
        from .display import edit_grid, png

        return png(edit_grid(self))

    def __repr__(self) -> str:
        rows = "vanilla and controlled" if self.vanilla is not None else "controlled"
        return (f"EditResult({[p.prompt for p in self.prompts]!r}, {self.settings.get('mode')}, {rows}, "
                f"{self.settings.get('steps')} steps{', local blend' if self.mask is not None else ''})")


def joint_refusal(family) -> str:
    """Why joint= (--joint) does not apply to a UNet family."""
    return (f"joint (--joint) sets how a replaced block enters an MM-DiT's joint softmax; {family.title} has "
            "cross-attention layers of its own: leave it out")


def edit_controllers(pipe, prompts: list[str], options: EditOptions, steps: int = 0,
                     max_sequence_length: int | None = None
                     ) -> tuple[list[PromptTokens], PromptToPrompt, LocalBlend | None]:
    """The edit's controllers, every option and word checked before any work. steps: the loop length to assume when
    the pipeline cannot tell it (the pipelines' own loop length is used otherwise)."""
    for word, factor in options.reweight:  # a re-weighted map goes back to the model's dtype: it must hold the factor
        check_factor(factor, f"the re-weight factor of {word!r}", denoiser(pipe).dtype, PromptError)
    family = family_of(pipe)
    if options.pooled == "source" and not family.pooled:
        raise PromptError(f"pooled='source' (--pooled source: every prompt gets the source's pooled text embedding) "
                          f"works on SDXL and SD3 pipelines, not on {family.title}: leave it at 'own'")
    if options.joint == "renormalize" and not family.joint:
        raise PromptError(joint_refusal(family))
    tokens = batch_tokens(pipe, prompts, max_sequence_length)
    p2p = PromptToPrompt(tokens, options, steps)
    blend = None
    if options.blend:
        reference = options.exact is not None
        res = options.blend_res or (16 if reference else None)  # the p2p code reads its 16x16 maps
        blend = LocalBlend(tokens, options.blend, options.subtract, options.threshold, start=options.blend_start,
                           res=res, per_prompt=reference, steps=steps)
    return tokens, p2p, blend


def edit_controller(p2p: PromptToPrompt, blend: LocalBlend | None, extra: AttentionController | None = None
                    ) -> Controllers:
    """The controllers in the order an edit runs them. The blend sees each prompt's own attention, before the edit;
    in reference mode it sees the edited attention, as the p2p code's store (which aliases the edited tensor) does."""
    if p2p.reference:
        return Controllers(p2p, blend, extra)
    return Controllers(blend, p2p, extra)


def _source_pooled(pipe, prompts: list[str], generation: GenerationOptions) -> dict:
    """SDXL or SD3 with pooled="source": every prompt's pooled text embedding replaced by the source's (pipeline
    kwargs), the prompts encoded by the family's adapter (`Family.encode`)."""
    generation = generation.resolved(pipe)
    with torch.no_grad(), exclusive(pipe):  # the pipeline's lock: its tokenizers are not to be shared by threads
        embeds, negative_embeds, pooled, negative_pooled = family_of(pipe).encode(
            pipe, prompts, generation.negative_prompt, generation.max_sequence_length, generation.guidance > 1)
    kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled[:1].expand_as(pooled).clone()}
    if generation.guidance > 1:
        kwargs.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs


def edit(pipe, source: str, targets: list[str] | str, options: EditOptions = EditOptions(),
         generation: GenerationOptions = GenerationOptions(), vanilla: bool = False, progress: bool = True,
         extra: AttentionController | None = None, inversion=None, **pipe_kwargs) -> EditResult:
    """Generate the source and the edited prompts from one latent, with attention control (and, with vanilla=True,
    once more without it, for the vanilla row: twice the cost).

    inversion: an `Inversion` of a real image; its caption must be the source prompt, and its latent, per-step
    unconditional embeddings, steps and guidance are used (the seed is then irrelevant).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    prompts = [source, *targets]
    generation = generation.resolved(pipe)
    if inversion is not None:
        from .inversion import check_inversion, sample_back, sampling_options

        check_inversion(pipe, inversion, source)
        generation = sampling_options(inversion, generation)

    def run(controller, **kwargs):  # from the seed's noise, or sampled back from the inversion
        if inversion is None:
            return generate(pipe, prompts, controller, generation, progress=progress, **kwargs)
        return sample_back(pipe, inversion, prompts, controller, generation, progress, **kwargs)

    tokens, p2p, blend = edit_controllers(pipe, prompts, options, generation.steps, generation.max_sequence_length)
    controlled_kwargs = dict(pipe_kwargs)
    if options.pooled == "source":
        if inversion is not None:
            raise PromptError("pooled='source' is not available when editing from an inversion")
        controlled_kwargs.update(_source_pooled(pipe, prompts, generation))
    try:
        controlled = run(edit_controller(p2p, blend, extra), **controlled_kwargs)
    except NonFiniteError as error:
        if not options.reweight:
            raise
        factors = ", ".join(f"{word}={factor:g}" for word, factor in options.reweight)
        raise NonFiniteError(f"{error} (re-weight factors {factors})") from None
    plain = run(None, **pipe_kwargs) if vanilla else None
    settings = {"prompts": prompts, **options.to_dict(), "mode": p2p.mode, "requested_mode": options.mode,
                **generation.to_dict(), "model": model_name(pipe)}
    kept = None
    if inversion is not None:
        settings["inversion"] = {"method": inversion.options.method, **inversion.settings}
        if blend is not None and blend.mask is not None:
            settings["background"] = {"kept": options.keep_background}
        if blend is not None and blend.mask is not None and options.keep_background:
            from .background import keep_background

            radius = int(pipe.vae_scale_factor) if options.feather is None else options.feather
            images, kept = keep_background(controlled.images[1:], inversion.image, blend.mask[1:], radius)
            controlled = replace(controlled, images=[controlled.images[0], *images])
            settings["background"].update(
                feather=radius, what=f"each edited image is the input image outside its last local-blend mask (the "
                f"input's pixels, exactly, beyond {radius} px of the mask; blended linearly within them)")
    return EditResult(tokens, controlled, plain, settings, blend.mask if blend else None, kept)
