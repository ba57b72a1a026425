"""Attention routing: one processor per UNet attention layer, installed through diffusers' official slot.

`control(pipe, controller)` installs a `RoutedProcessor` on every attention layer with `unet.set_attn_processor` and
always puts the originals back. A layer whose probabilities the controller does not want (`controller.wants(...)`
is false) calls the original processor unchanged, so it keeps the fused SDPA kernel and costs nothing. A wanted layer
runs diffusers' classic explicit attention and hands the probabilities of the *conditional* half of the batch to the
controller, which may read them (recording) or return replacements (editing).

Denoising steps are counted by the pipeline's own `callback_on_step_end` (`router.callback`), never by counting
layer calls; the latent size and batch come from a forward pre-hook on the UNet, and the length of the denoising loop
from the pipeline when its first UNet call happens (Heun-type schedulers run 2N-1 iterations for N steps, and every
step schedule is a fraction of the loop really run).

One pipeline runs one generation at a time: `control` (and `exclusive`) hold a lock per UNet, so overlapping
generations from several threads wait for each other instead of installing and restoring processors out of order.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import P2PError


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
            c.begin(run)

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
        self._ids = None  # Flux: (the image ids tensor last seen, its grid), so the grid is read from it only once

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _loop_length(self) -> int:
        if self.pipe is None:
            return 0
        steps = getattr(self.pipe, "_num_timesteps", None)  # set by diffusers pipelines just before their loop
        if not steps:
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            steps = len(timesteps) if timesteps is not None else 0
        return int(steps)

    def _on_unet_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        batch, _, h, w = sample.shape
        if self.run is None or self.run.latent_size != (h, w) or self.run.batch != batch:
            prompts = self.prompts or (batch // 2 if batch % 2 == 0 else batch)
            sides = tuple(sorted({-(-max(h, w) // 2**level) for level in self.levels}, reverse=True))
            self.run = RunInfo((h, w), prompts, batch, sample.device, sample.dtype, self._loop_length(), sides)
            self._res.clear()
            self.controller.begin(self.run)

    def _on_transformer_call(self, module, args, kwargs):
        """An MM-DiT's forward: its image-token grid (SD3: latents / patch; Flux: from its image ids), text length."""
        sample = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        self.text_tokens = 0 if text is None else text.shape[1]
        batch = sample.shape[0]
        if sample.ndim == 4:  # SD3: (batch, channels, h, w) latents, patchified inside
            patch = module.config.patch_size
            latent = tuple(sample.shape[2:])
            grid, packed = (latent[0] // patch, latent[1] // patch), False
        else:  # Flux: (batch, tokens, channels) packed latents; img_ids hold each token's (0, row, column)
            ids = kwargs["img_ids"]
            if self._ids is None or self._ids[0] is not ids:  # read once: the pipeline passes one tensor every step
                self._ids = (ids, (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1))
            grid = self._ids[1]
            latent, packed = grid, True
        if self.run is None or self.run.grid != grid or self.run.batch != batch:
            prompts = self.prompts or (batch // 2 if batch % 2 == 0 else batch)
            self.run = RunInfo(latent, prompts, batch, sample.device, sample.dtype, self._loop_length(),
                               (max(grid),), grid, packed)
            self.controller.begin(self.run)

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Pass as the pipeline's `callback_on_step_end` (with "latents" among its tensor inputs)."""
        out = {}
        latents = callback_kwargs.get("latents")  # (prompts, channels, h, w): the pipeline's own latents
        if latents is not None:
            new = self.controller.step_end(step, timestep, latents)
            if new is not None:
                out["latents"] = new.to(latents.dtype)
        self.step = step + 1
        return out

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
        """How many of a call's `batch` rows are conditional (the last ones): the rows controllers see."""
        return min(batch, self.run.prompts) if self.run else batch

    def route(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        """probs: (batch, heads, queries, keys). Hands the conditional rows (the last `conditional(batch)`) to the
        controller; returns the probabilities to use, changed where the controller said."""
        batch = probs.shape[0]
        free = batch - self.conditional(batch)
        rows = probs[free:] if free else probs
        new = self.controller.attention(rows, site)
        if new is None or new is rows:  # nothing changed, or changed in place
            return probs
        if free == 0:
            return new.to(probs.dtype)
        if probs.requires_grad:  # softmax's backward needs its output unchanged
            return torch.cat([probs[:free], new.to(probs.dtype)])
        probs[free:] = new.to(probs.dtype)  # in place: probs is this call's own fresh tensor
        return probs


# Per image, heads * queries * keys from which the unconditional rows take the fused kernel (measured on this 2-core
# CPU: at SD 1.5's 64x64 level, 8 x 4096 x 77, two calls cost less than one explicit pass; at 1024 queries and below
# one explicit pass over the whole batch costs less)
SPLIT_ELEMENTS = 2**21

# diffusers' processors whose arithmetic `RoutedProcessor.explicit` restates (classic attention with the probabilities
# materialised); a wanted layer with another processor (IP-Adapter, a custom one) cannot be controlled faithfully.
STOCK_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                    "FusedAttnProcessor2_0", "AttnProcessorNPU")


class RoutedProcessor:
    """Calls the original processor, or, where the controller wants the probabilities, explicit attention."""

    def __init__(self, router: Router, layer: LayerInfo, original):
        self.router = router
        self.layer = layer
        self.original = original
        self.stock = type(original).__name__ in STOCK_PROCESSORS  # whether `explicit` restates its arithmetic
        self._cache = None  # (text tensor, its version, keys, values): a cross-attention layer's text projections
        # diffusers' Attention.forward keeps only the cross_attention_kwargs that `processor.__call__` declares. Show it
        # the original processor's signature (an instance attribute: calls still go through the class's __call__), so
        # that keyword arguments the original takes reach it.
        def call(*args, **kwargs):
            return self._call(*args, **kwargs)

        call.__signature__ = inspect.signature(original.__call__)  # what inspect.signature reports, computed once
        self.__call__ = call

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        pixels = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        site = Site(self.layer, self.router.resolution(pixels), self.router.step)
        if not self.router.controller.wants(site):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        if not self.stock:
            raise P2PError(f"the layer {self.layer.name} uses {type(self.original).__name__}; attention control "
                           f"recomputes a layer's attention explicitly and supports diffusers' standard processors "
                           f"({', '.join(STOCK_PROCESSORS)})")
        return self.explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb, site)

    def _text_keys(self, attn, encoder_hidden_states):
        """(keys, values), each (batch * heads, keys, head_dim), of a cross-attention layer's text.

        The text is the same tensor at every step of a generation (the pipeline encodes the prompts once), so its
        projections are made once and reused while that tensor is unchanged (same object, same version); with
        gradients on (training) they are always made anew."""
        cached = self._cache
        stamp = _version(encoder_hidden_states)
        if cached is not None and cached[0] is encoder_hidden_states and cached[1] == stamp \
                and not torch.is_grad_enabled():
            return cached[2], cached[3]
        text = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key, value = self._heads(attn, attn.to_k(text)), self._heads(attn, attn.to_v(text))
        if attn.norm_k is not None:
            key = attn.norm_k(key.unflatten(0, (-1, attn.heads))).flatten(0, 1)
        if attn.upcast_attention:
            key = key.float()
        if not torch.is_grad_enabled():
            self._cache = (encoder_hidden_states, stamp, key, value)
        return key, value

    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads * head_dim) -> (batch * heads, tokens, head_dim), contiguous (one copy)."""
        batch, tokens, width = x.shape
        return x.view(batch, tokens, attn.heads, width // attn.heads).transpose(1, 2).reshape(
            batch * attn.heads, tokens, width // attn.heads)

    def explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, site: Site):
        # AttnProcessor2_0's arithmetic with the probabilities materialised (diffusers' get_attention_scores: scale,
        # optional upcast, softmax) and passed through the router. Heads are folded into the batch (one copy per
        # tensor), so each product is one bmm; a cross-attention layer's text keys and values are made once per
        # generation (`_text_keys`).
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch, keys, _ = (encoder_hidden_states if cross else hidden_states).shape
        heads = attn.heads
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)  # (batch * heads, 1|q, keys)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self._heads(attn, attn.to_q(hidden_states))  # (batch * heads, queries, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query.unflatten(0, (-1, heads))).flatten(0, 1)
        dtype = query.dtype
        if cross:
            key, value = self._text_keys(attn, encoder_hidden_states)
        else:
            key, value = self._heads(attn, attn.to_k(hidden_states)), self._heads(attn, attn.to_v(hidden_states))
            if attn.norm_k is not None:
                key = attn.norm_k(key.unflatten(0, (-1, heads))).flatten(0, 1)
            key = key.float() if attn.upcast_attention else key
        query = (query.float() if attn.upcast_attention else query) * attn.scale  # on the queries, as before
        queries, head_dim = query.shape[1], value.shape[-1]
        # Controllers see only the conditional rows (`Router.route`). Where the attention is large, the unconditional
        # ones (classifier-free guidance's first half) take the fused kernel, as in the stock processor, and only the
        # rest is explicit; where it is small, one explicit pass over the whole batch costs less than two calls.
        free = batch - self.router.conditional(batch)
        split = free if heads * queries * keys >= SPLIT_ELEMENTS else 0
        rows = slice(split * heads, None)  # the explicit rows of the (batch * heads) tensors
        mask = attention_mask[rows] if attention_mask is not None and attention_mask.shape[0] > 1 else attention_mask
        if mask is None:
            scores = torch.bmm(query[rows], key[rows].transpose(1, 2))  # (rows, queries, keys)
        else:
            scores = torch.baddbmm(mask, query[rows], key[rows].transpose(1, 2))
        # the softmax in float32 whatever the model's precision (as the fused kernels accumulate): controllers see
        # float32 probabilities, and maps are summed from them; the product with the values is in the model's
        probs = scores.softmax(-1) if scores.dtype == torch.float32 else torch.softmax(scores, -1, dtype=torch.float32)
        probs = self.router.route(probs.view(-1, heads, queries, keys), site)  # (batch - split, heads, q, keys)
        probs = probs if probs.dtype == value.dtype else probs.to(value.dtype)
        hidden_states = torch.bmm(probs.view(-1, queries, keys), value[rows])  # (rows, queries, head_dim)
        if split:
            plain_mask = None if attention_mask is None else \
                attention_mask[: split * heads].view(split, heads, -1, keys) if attention_mask.shape[0] > 1 \
                else attention_mask.view(1, 1, -1, keys)
            plain = F.scaled_dot_product_attention(  # the queries are already scaled
                query[: split * heads].to(dtype).view(split, heads, queries, head_dim),
                key[: split * heads].to(dtype).view(split, heads, keys, head_dim),
                value[: split * heads].view(split, heads, keys, head_dim), attn_mask=plain_mask, scale=1.0)
            hidden_states = torch.cat([plain.flatten(0, 1), hidden_states.to(plain.dtype)])
        hidden_states = hidden_states.view(batch, heads, queries, head_dim).transpose(1, 2).reshape(
            batch, queries, heads * head_dim)
        if hidden_states.dtype != residual.dtype:
            hidden_states = hidden_states.to(residual.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor if attn.rescale_output_factor != 1 else hidden_states


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place version counter; -1 for an inference-mode tensor, which has none (the pipelines never
    change their text embeddings in place: a callback that changes them hands over a new tensor)."""
    return -1 if t.is_inference() else t._version


def layer_info(unet, name: str) -> LayerInfo:
    module = unet.get_submodule(name.removesuffix(".processor"))
    parts = name.split(".")
    place = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(parts[0], parts[0])
    block = int(parts[1]) if place in ("down", "up") else 0
    levels = len(getattr(unet, "down_blocks", ()))  # each down block but the last halves the side
    level = {"down": block, "mid": levels - 1, "up": levels - 1 - block}.get(place) if levels else None
    return LayerInfo(name, place, block, bool(module.is_cross_attention), int(module.heads), level)


def denoiser(pipe):
    """The pipeline's denoising network: its UNet, or its transformer (MM-DiT); a bare network is itself."""
    for name in ("unet", "transformer"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    return pipe


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


@contextmanager
def control(pipe, controller: AttentionController, prompts: int | None = None) -> Iterator[Router]:
    """Route every attention layer of the pipeline's UNet or MM-DiT through controller; always restore the originals.

    Use `router.callback` as the pipeline's `callback_on_step_end`. `prompts` is the number of conditional images per
    UNet call (default: half the batch when it is even, i.e. classifier-free guidance). `pipe` may be a bare UNet
    (training), whose step schedules then have no loop length.
    """
    unet = denoiser(pipe)
    with exclusive(unet):
        originals = dict(unet.attn_processors)
        if hasattr(unet, "transformer_blocks"):  # an MM-DiT (SD3, Flux): joint attention
            from .joint import JointRoutedProcessor

            router = Router(controller, prompts, pipe if unet is not pipe else None)
            routed = {name: JointRoutedProcessor(router, name, unet.get_submodule(name.removesuffix(".processor")),
                                                 proc) for name, proc in originals.items()}
            on_call = router._on_transformer_call
        else:
            layers = {name: layer_info(unet, name) for name in originals}
            levels = tuple(sorted({i.level for i in layers.values() if i.is_cross and i.level is not None}))
            router = Router(controller, prompts, pipe if unet is not pipe else None, levels)
            routed = {name: RoutedProcessor(router, layers[name], proc) for name, proc in originals.items()}
            on_call = router._on_unet_call
        unet.set_attn_processor(dict(routed))  # set_attn_processor empties the dict it is given
        hook = unet.register_forward_pre_hook(on_call, with_kwargs=True)
        try:
            yield router
        finally:
            hook.remove()
            unet.set_attn_processor(dict(originals))
