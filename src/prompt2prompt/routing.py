"""Attention routing, whatever the architecture: the controller protocol, the shapes of a run, and the router.

A controller (`AttentionController`) says which attention calls it wants (`wants(site)`), may read or replace their
probabilities (`attention(probs, site)`), and sees the latents after each step (`step_end`). A `Router` holds the
state one `attention.control` block shares among the processors its installer put in the denoiser's attention slots:
the controller, the step (counted by the pipeline's own `callback_on_step_end`: `Router.callback`, never by counting
layer calls), and the run's shapes (`RunInfo`, set by the installer's forward pre-hook on the denoiser). Installers:
`attention.py` (UNet layers) and `joint.py` (MM-DiT joint attention); this module imports neither.

One pipeline runs one generation at a time: `exclusive` holds a lock per denoiser, so overlapping generations from
several threads wait for each other instead of installing and restoring processors out of order.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerInfo:
    name: str  # the processor key, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    place: str  # "down", "mid" or "up"
    block: int  # index of the block within its place (0 for mid)
    is_cross: bool  # cross-attention (to the text) or self-attention (among pixels)
    heads: int
    level: int | None = None  # resolution level: 0 at the latent's size, each level half the side; None: unknown


@dataclass(frozen=True)
class Site:
    """Where and when one attention call happens."""

    layer: LayerInfo
    res: tuple[int, int]  # (height, width) of the layer's feature map
    step: int  # denoising step, 0-based, counted by the pipeline's step-end callback

    @property
    def pixels(self) -> int:
        return self.res[0] * self.res[1]


class AttentionController:
    """Base class: sees (and may replace) attention probabilities, and the latents after each step.

    Subclasses override what they need. `wants` must be cheap: it runs for every attention call.
    """

    def wants(self, site: Site) -> bool:
        """Whether this call's probabilities are needed (otherwise the layer keeps its fused kernel)."""
        return False

    def attention(self, probs: torch.Tensor, site: Site) -> torch.Tensor | None:
        """probs: (prompts, heads, queries, keys) of the conditional half. Return a replacement, None to keep them,
        or probs itself after changing it in place (allowed where it does not require grad)."""
        return None

    def begin(self, run: RunInfo) -> None:
        """Called before the first UNet call of a generation."""

    def step_end(self, step: int, timestep, latents: torch.Tensor) -> torch.Tensor | None:
        """After step `step` with latents (prompts, channels, h, w), the pipeline's own. Return replacements or None."""
        return None


def _begin(controller, run: RunInfo) -> None:
    """A controller's `begin`, where it has one: any object with wants / attention / step_end is a controller."""
    begin = getattr(controller, "begin", None)
    if begin is not None:
        begin(run)


class Controllers(AttentionController):
    """Several controllers at once (for instance an edit and a recorder); each sees the previous one's output."""

    def __init__(self, *controllers: AttentionController):
        self.controllers = [c for c in controllers if c is not None]

    def wants(self, site: Site) -> bool:
        return any(c.wants(site) for c in self.controllers)

    def attention(self, probs, site):
        changed = None
        for c in self.controllers:
            if c.wants(site):
                out = c.attention(probs, site)
                if out is not None:
                    probs = changed = out
        return changed

    def begin(self, run):
        for c in self.controllers:
            _begin(c, run)

    def step_end(self, step, timestep, latents):
        changed = None
        for c in self.controllers:
            out = c.step_end(step, timestep, latents)
            if out is not None:
                latents = changed = out
        return changed


@dataclass(frozen=True)
class RunInfo:
    latent_size: tuple[int, int]  # (height, width) of the latents
    prompts: int  # conditional images in the batch
    batch: int  # images per UNet call (2 * prompts with classifier-free guidance)
    device: torch.device
    dtype: torch.dtype
    steps: int = 0  # iterations of the pipeline's denoising loop (= step callbacks); 0 when unknown (a bare UNet)
    sides: tuple[int, ...] = ()  # longer sides of the model's cross-attention maps at this latent size, largest first
    grid: tuple[int, int] | None = None  # MM-DiT: (rows, columns) of the image tokens every layer attends over
    packed: bool = False  # the pipeline's latents are a sequence of grid tokens (Flux), not an image

    @property
    def self_side(self) -> int:
        """Self-attention is replaced at maps whose longer side is at most this: a quarter of the latent's side."""
        return small_map_sides(self.latent_size, self.sides)[0]

    @property
    def map_side(self) -> int:
        """Maps are read (local blend, recorded self-attention) at this side by default."""
        return small_map_sides(self.latent_size, self.sides)[1]

    @property
    def self_map_side(self) -> int:
        """Self-attention is recorded by default at the map side when that is small (<= max(16, latent side / 4)),
        else not at all (0): an MM-DiT at 1024 px has only 64x64 maps, whose self-attention is 4096 x 4096."""
        side = self.map_side
        return side if side <= max(16, max(self.latent_size) // 4) else 0


def small_map_sides(latent_size: tuple[int, int], sides: tuple[int, ...]) -> tuple[int, int]:
    """The one rule for "small" attention maps, from the p2p code at SD's 64x64 latents, where both are 16.

    (self_side, map_side): self-attention is replaced at maps whose longer side is at most a quarter of the latent's
    (the p2p code's 16x16-query maps at 64x64 latents; 4x4 on the 16x16-latent shapes model, where 16x16 would be
    the whole image). Maps are read (local blend, recorded self-attention) at the largest side the model has that is
    at most max(16, a quarter of the latent's side): the p2p code's 16x16 maps at 64x64 latents, the full 16x16 maps
    on shapes (a quarter, 4x4, is too coarse to mask or draw with), 32x32 at SDXL's 128x128 latents.
    """
    side = max(latent_size)
    quarter = max(1, side // 4)
    bound = max(16, quarter)
    fitting = [s for s in sides if s <= bound]
    return quarter, (max(fitting) if fitting else min(sides, default=min(side, 16)))


class Router:
    """State shared by the processors of one `control` block: the controller, the step, the run's shapes."""

    def __init__(self, controller: AttentionController, prompts: int | None = None, pipe=None,
                 levels: tuple[int, ...] = ()):
        self.controller = controller
        self.prompts = prompts  # conditional images per UNet call; None: half the batch when it is even, else all
        self.pipe = pipe  # the pipeline, read for the length of its denoising loop (None: a bare UNet)
        self.levels = levels  # resolution levels of the cross-attention layers
        self.step = 0
        self.run: RunInfo | None = None
        self.text_tokens = 0  # MM-DiT: text tokens in the joint sequence (Flux's single blocks get them concatenated)
        self._res: dict[int, tuple[int, int]] = {}
        self.calls = 0  # denoiser calls since the last step end (families that run guidance as separate calls)
        self.passive = False  # this call is an unconditional one of such a family: the controller is passed by
        self.conditional_first = False  # a call's conditional rows come first (Z-Image), not last

    # -- hooks ----------------------------------------------------------------------------------------------------
    def loop_length(self) -> int:
        """Iterations of the pipeline's denoising loop (0 for a bare network, whose loop is unknown)."""
        if self.pipe is None:
            return 0
        steps = getattr(self.pipe, "_num_timesteps", None)  # set by diffusers pipelines just before their loop
        if not steps:
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            steps = len(timesteps) if timesteps is not None else 0
        return int(steps)

    def prompts_in(self, batch: int) -> int:
        """Conditional images in a denoiser call of `batch` rows: as given, else half the batch when it is even
        (classifier-free guidance), else all of it."""
        return self.prompts or (batch // 2 if batch % 2 == 0 else batch)

    def start(self, run: RunInfo) -> None:
        """A generation (or a new latent size) begins: the installers' forward pre-hooks call this with its shapes."""
        self.run = run
        self._res.clear()
        _begin(self.controller, run)

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Pass as the pipeline's `callback_on_step_end` (with "latents" among its tensor inputs)."""
        latents = callback_kwargs.get("latents")  # (prompts, channels, h, w): the pipeline's own latents
        new = self.end_step(step, timestep, latents)
        return {} if new is None else {"latents": new}

    def end_step(self, step: int, timestep, latents: torch.Tensor | None) -> torch.Tensor | None:
        """Step `step` of the loop has ended with these latents: the controller's step end (its replacement latents,
        in their dtype, or None), and the count moves on. The step callback calls it, or a trace's scheduler hook."""
        new = None
        if latents is not None:
            new = self.controller.step_end(step, timestep, latents)
            new = None if new is None else new.to(latents.dtype)
        self.step = step + 1
        self.calls, self.passive = 0, False
        return new

    # -- per attention call ------------------------------------------------------------------------------------------
    def resolution(self, pixels: int) -> tuple[int, int]:
        """(h, w) of a map of this many pixels: the level of the latent whose halved (rounded up) sides give it."""
        res = self._res.get(pixels)
        if res is None:
            h, w = self.run.latent_size if self.run else (int(math.isqrt(pixels)),) * 2
            res = next(((-(-h // 2**k), -(-w // 2**k)) for k in range(16)
                        if -(-h // 2**k) * -(-w // 2**k) == pixels), None)
            if res is None:  # not a halving of the latent (another architecture): the nearest aspect-true guess
                factor = max(1, round(math.sqrt(h * w / pixels)))
                rh = -(-h // factor)
                res = (rh, pixels // rh)
            self._res[pixels] = res
        return res

    def conditional(self, batch: int) -> int:
        """How many of a call's `batch` rows are conditional (which ones: `rows`): the rows controllers see."""
        return min(batch, self.run.prompts) if self.run else batch

    def rows(self, batch: int) -> slice:
        """The conditional rows of a call of `batch` rows: the last ones, or the first where they come first."""
        n = self.conditional(batch)
        return slice(0, n) if self.conditional_first else slice(batch - n, batch)

    def route(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        """probs: (batch, heads, queries, keys). Hands the conditional rows (`rows(batch)`) to the controller;
        returns the probabilities to use, changed where the controller said."""
        batch = probs.shape[0]
        cond = self.rows(batch)
        rows = probs[cond]
        new = self.controller.attention(rows, site)
        if new is None or new is rows:  # nothing changed, or changed in place
            return probs
        if cond.stop - cond.start == batch:
            return new.to(probs.dtype)
        if probs.requires_grad:  # softmax's backward needs its output unchanged
            return torch.cat([probs[: cond.start], new.to(probs.dtype), probs[cond.stop:]])
        probs[cond] = new.to(probs.dtype)  # in place: probs is this call's own fresh tensor
        return probs


def denoiser(pipe):
    """The pipeline's denoising network: its UNet, or its transformer (MM-DiT); a bare network is itself."""
    for name in ("unet", "transformer"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    return pipe


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes: its execution device (under offload the weights wait on the CPU), or a bare
    network's device."""
    device = getattr(pipe, "_execution_device", None)
    return torch.device(denoiser(pipe).device if device is None else device)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextmanager
def exclusive(pipe) -> Iterator[None]:
    """Hold the pipeline's lock: one generation (or inversion) at a time per UNet; re-entrant within a thread."""
    unet = denoiser(pipe)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(unet, threading.RLock())
    with lock:
        yield
