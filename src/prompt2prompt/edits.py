"""Prompt-to-Prompt edits: word swap (replace), added words (refine), re-weighting, local blending, step schedules.

One source prompt and several edited prompts run in one batch from one initial latent; the edits touch only the
conditional half (the router hands controllers nothing else). Defaults are the p2p notebook's: cross-attention
replaced for 80% of the steps, self-attention for 40%, local-blend threshold 0.3 from 20% of the steps on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .alignment import refine_alignment, replace_mapper
from .attention import AttentionController, Controllers, RunInfo, Site
from .errors import PromptError
from .generation import Generation, GenerationOptions, generate
from .schedule import Span, cross_schedule, step_range
from .tokens import PromptTokens

MODES = ("auto", "replace", "refine", "reweight")


@dataclass(frozen=True)
class EditOptions:
    mode: str = "auto"  # auto (replace if the word counts match, else refine), replace, refine, reweight
    cross_steps: Span | Mapping[str, Span] = 0.8  # steps whose cross-attention comes from the source; per word too
    self_steps: Span = 0.4  # steps whose self-attention comes from the source
    self_max_side: int | None = None  # self-attention replaced at maps this small or smaller; None: latent side / 4
    reweight: tuple[tuple[str, float], ...] = ()  # (word, factor): scale a word's cross-attention (may be negative)
    blend: tuple[str, ...] = ()  # local blend: words whose attention masks the region that may change
    subtract: tuple[str, ...] = ()  # local blend: words whose region must not change
    threshold: float = 0.3  # local blend: mask threshold on the max-normalised attention
    blend_start: float = 0.2  # local blend: fraction of the steps before blending starts
    blend_res: int | None = None  # local blend: map side to use; None: largest recorded side <= max(16, latent/4)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["cross_steps"] = dict(self.cross_steps) if isinstance(self.cross_steps, Mapping) else self.cross_steps
        return d


def _word_positions(prompts: list[PromptTokens], words: tuple[str, ...], what: str) -> torch.Tensor:
    """(prompts, tokens) 0/1: the positions of the given words in each prompt that has them. Every word must occur."""
    weights = torch.zeros(len(prompts), prompts[0].length)
    for word in words:
        found = False
        for k, p in enumerate(prompts):
            for match in p.find(word):
                weights[k, list(match)] = 1.0
                found = True
        if not found:
            raise PromptError(f"the {what} word {word!r} is in none of the prompts: "
                              + " | ".join(f"{p.prompt!r}" for p in prompts))
    return weights


def _to(t: torch.Tensor | None, run: RunInfo) -> torch.Tensor | None:
    return None if t is None else t.to(run.device, run.dtype)


class LocalBlend(AttentionController):
    """After each step from `start` on, reset the edited latents to the source's outside the words' attention mask.

    The mask (p2p paper, Algorithm 1, lines 11-14): the chosen words' cross-attention summed over steps so far,
    averaged over layers at one map side and over heads, 3x3 max-pooled, resized to the latent, divided by its
    maximum, thresholded; the union of the source's and each edited prompt's mask, minus the subtract words' mask.
    """

    def __init__(self, prompts: list[PromptTokens], words: tuple[str, ...], subtract: tuple[str, ...] = (),
                 threshold: float = 0.3, start: int = 0, res: int | None = None):
        self.words = _word_positions(prompts, words, "blend")  # (prompts, tokens)
        self.sub = _word_positions(prompts, subtract, "subtract") if subtract else None
        self.threshold = threshold
        self.start = start
        self.res = res
        self.side = 0
        self.latent_size: tuple[int, int] = (0, 0)
        self._chosen: tuple[int, int] | None = None  # the map size used, picked on the first step
        self.acc: torch.Tensor | None = None  # (prompts, h, w) word attention summed over layers and steps
        self.acc_sub: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (prompts, 1, H, W) the last mask applied (row 0: source)

    def begin(self, run: RunInfo) -> None:
        self.side = self.res or max(16, max(run.latent_size) // 4)
        self.latent_size = run.latent_size
        self.acc = self.acc_sub = self.mask = None
        self._chosen = None
        self.words, self.sub = self.words.to(run.device, run.dtype), _to(self.sub, run)

    def wants(self, site: Site) -> bool:
        if not site.layer.is_cross or max(site.res) > self.side:
            return False
        if self._chosen is None or site.pixels > self._chosen[0] * self._chosen[1]:
            self._chosen = site.res  # the largest map side not above self.side, found on the first step
            self.acc = self.acc_sub = None
        return site.res == self._chosen

    def attention(self, probs, site):
        # probs: (prompts, heads, pixels, tokens) -> word attention per pixel, summed over the words' tokens
        h, w = site.res
        words = torch.einsum("phqk,pk->pq", probs, self.words) / probs.shape[1]  # (prompts, pixels)
        words = words.reshape(-1, h, w).float()
        self.acc = words if self.acc is None else self.acc + words
        if self.sub is not None:
            sub = (torch.einsum("phqk,pk->pq", probs, self.sub) / probs.shape[1]).reshape(-1, h, w).float()
            self.acc_sub = sub if self.acc_sub is None else self.acc_sub + sub
        return None

    def _mask(self, maps: torch.Tensor) -> torch.Tensor:
        maps = F.max_pool2d(maps[:, None], 3, stride=1, padding=1)  # (prompts, 1, h, w)
        maps = F.interpolate(maps, size=self.latent_size)  # nearest, as the p2p code
        peak = maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        return (maps / peak) > self.threshold

    def step_end(self, step, timestep, latents):
        if step < self.start or self.acc is None:
            return None
        mask = self._mask(self.acc)
        mask = mask[:1] | mask  # union of the source's mask and each prompt's own
        if self.acc_sub is not None:
            keep_out = self._mask(self.acc_sub)
            mask = mask & ~(keep_out[:1] | keep_out)
        self.mask = mask
        m = mask[1:].to(latents.dtype)
        source = latents[:1]
        return torch.cat([source, source + m * (latents[1:] - source)])


class PromptToPrompt(AttentionController):
    """Cross-attention replacement (replace or refine), re-weighting, and self-attention replacement."""

    def __init__(self, prompts: list[PromptTokens], options: EditOptions, steps: int):
        if len(prompts) < 2:
            raise PromptError("an edit needs a source prompt and at least one edited prompt")
        if options.mode not in MODES:
            raise PromptError(f"unknown edit mode {options.mode!r}: expected one of {', '.join(MODES)}")
        self.options = options
        source, targets = prompts[0], prompts[1:]
        mode = options.mode
        if mode == "auto":
            mode = "replace" if all(len(t.words) == len(source.words) for t in targets) else "refine"
        self.mode = "replace" if mode == "reweight" else mode
        if self.mode == "replace":
            self.mapper = torch.stack([replace_mapper(source, t) for t in targets])  # (targets, tokens, tokens)
        else:
            aligned = [refine_alignment(source, t) for t in targets]
            self.index = torch.stack([a.index for a in aligned])  # (targets, tokens)
            self.weight = torch.stack([a.weight for a in aligned])  # (targets, tokens)
        self.alpha = cross_schedule(options.cross_steps, targets, steps)  # (steps, targets, tokens)
        self.cross_active = (self.alpha.flatten(1).amax(1) > 0).tolist()  # per step; plain bools for wants()
        self.self_range = step_range(options.self_steps, steps)
        self.equalizer = None
        if options.reweight:
            eq = torch.ones(len(targets), source.length)
            for word, factor in options.reweight:
                positions = _word_positions(targets, (word,), "re-weight")
                eq = torch.where(positions > 0, torch.full_like(eq, float(factor)), eq)
            self.equalizer = eq
        self.self_side = 0

    def begin(self, run: RunInfo) -> None:
        self.self_side = self.options.self_max_side or max(1, max(run.latent_size) // 4)
        # moved to the UNet's device once per run, not per layer call
        for name in ("mapper", "weight", "alpha", "equalizer"):
            setattr(self, name, _to(getattr(self, name, None), run))
        if self.mode == "refine":
            self.index = self.index.to(run.device)

    def wants(self, site: Site) -> bool:
        if site.step >= len(self.cross_active):
            return False
        if site.layer.is_cross:
            return self.cross_active[site.step]
        return self.self_range[0] <= site.step < self.self_range[1] and max(site.res) <= self.self_side

    def attention(self, probs, site):
        # probs: (prompts, heads, queries, keys); row 0 is the source
        base, edited = probs[:1], probs[1:]
        if not site.layer.is_cross:
            return torch.cat([base, base.expand_as(edited)])
        if self.mode == "replace":
            mapped = torch.einsum("hqs,bst->bhqt", base[0], self.mapper)  # (targets, heads, queries, tokens)
        else:
            mapped = base[0][:, :, self.index].permute(2, 0, 1, 3)  # (targets, heads, queries, tokens)
            w = self.weight[:, None, None, :]
            mapped = mapped * w + edited * (1 - w)  # new tokens keep their own attention
        if self.equalizer is not None:
            mapped = mapped * self.equalizer[:, None, None, :]
        alpha = self.alpha[site.step][:, None, None, :]  # (targets, 1, 1, tokens)
        return torch.cat([base, mapped * alpha + edited * (1 - alpha)])


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


def edit_controllers(pipe, prompts: list[str], options: EditOptions, steps: int
                     ) -> tuple[list[PromptTokens], PromptToPrompt, LocalBlend | None]:
    tokens = [PromptTokens.from_tokenizer(pipe.tokenizer, p) for p in prompts]
    p2p = PromptToPrompt(tokens, options, steps)
    blend = None
    if options.blend:
        blend = LocalBlend(tokens, options.blend, options.subtract, options.threshold,
                           start=int(options.blend_start * steps), res=options.blend_res)
    elif options.subtract:
        raise PromptError("subtract words only make sense with blend words (--blend)")
    return tokens, p2p, blend


def edit(pipe, source: str, targets: list[str] | str, options: EditOptions = EditOptions(),
         generation: GenerationOptions = GenerationOptions(), vanilla: bool = True, progress: bool = True,
         extra: AttentionController | None = None, inversion=None, **pipe_kwargs) -> EditResult:
    """Generate the source and the edited prompts from one latent, with attention control (and, if asked, without).

    inversion: an `Inversion` of a real image; its caption must be the source prompt, and its latent, per-step
    unconditional embeddings, steps and guidance are used (the seed is then irrelevant).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    prompts = [source, *targets]
    if inversion is not None:
        from .inversion import ensure_ddim

        if inversion.prompt.strip() != source.strip():
            raise PromptError(f"the inversion was made with the caption {inversion.prompt!r}; pass that caption as "
                              f"the source prompt (got {source!r})")
        ensure_ddim(pipe)
        generation = replace(generation, steps=inversion.options.steps, guidance=inversion.options.guidance)
        pipe_kwargs.update(latent=inversion.latent, uncond=inversion.uncond)
    tokens, p2p, blend = edit_controllers(pipe, prompts, options, generation.steps)
    controller = Controllers(blend, p2p, extra)  # the blend sees each prompt's own attention, before the edit
    controlled = generate(pipe, prompts, controller, generation, progress=progress, **pipe_kwargs)
    plain = generate(pipe, prompts, None, generation, progress=progress, **pipe_kwargs) if vanilla else None
    settings = {"prompts": prompts, **options.to_dict(), "mode": p2p.mode, "requested_mode": options.mode,
                **generation.to_dict()}
    if inversion is not None:
        settings["inversion"] = {"method": inversion.options.method, **inversion.settings}
    return EditResult(tokens, controlled, plain, settings, blend.mask if blend else None)
