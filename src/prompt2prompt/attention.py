"""Attention control, and its installer for UNet attention layers (SD 1.x, 2.x, XL).

`control(pipe, controller)` routes every attention module of the pipeline's denoiser through the controller and
always puts the originals back: the UNet installer here (`RoutedProcessor`, one per layer, through diffusers'
official `set_attn_processor` slot), the MM-DiT one in `joint.py`; which one comes from the pipeline's family
(`families.family_of`). The protocol and the router they share are in `routing.py` (re-exported here).

A layer whose probabilities the controller does not want (`controller.wants(...)` is false) calls the original
processor unchanged, so it keeps the fused SDPA kernel and costs nothing. A wanted layer runs diffusers' classic
explicit attention and hands the probabilities of the *conditional* half of the batch to the controller, which may
read them (recording) or return replacements (editing). The latent size and batch come from a forward pre-hook on the
UNet, and the length of the denoising loop from the pipeline when its first UNet call happens (Heun-type schedulers
run 2N-1 iterations for N steps, and every step schedule is a fraction of the loop really run).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .errors import P2PError
from .families import family_of
from .joint import install as install_joint
from .routing import (  # noqa: F401  (re-exported: the public names of attention control)
    AttentionController,
    Controllers,
    LayerInfo,
    Router,
    RunInfo,
    Site,
    denoiser,
    exclusive,
    small_map_sides,
)

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

def _on_unet_call(router: Router):
    """The UNet's forward pre-hook: the run's latent size, batch and map sides, when they change."""

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        batch, _, h, w = sample.shape
        run = router.run
        if run is None or run.latent_size != (h, w) or run.batch != batch:
            sides = tuple(sorted({-(-max(h, w) // 2**level) for level in router.levels}, reverse=True))
            router.start(RunInfo((h, w), router.prompts_in(batch), batch, sample.device, sample.dtype,
                                 router.loop_length(), sides))

    return hook


@contextmanager
def control(pipe, controller: AttentionController, prompts: int | None = None) -> Iterator[Router]:
    """Route every attention layer of the pipeline's UNet or MM-DiT through controller; always restore the originals.

    Use `router.callback` as the pipeline's `callback_on_step_end`. `prompts` is the number of conditional images per
    UNet call (default: half the batch when it is even, i.e. classifier-free guidance). `pipe` may be a bare UNet
    (training), whose step schedules then have no loop length.
    """
    unet = denoiser(pipe)
    with exclusive(unet):
        family = family_of(pipe)
        modules = family.modules(unet)  # only these are routed (None: every one of attn_processors)
        originals = dict(unet.attn_processors) if modules is None else {k: m.processor for k, m in modules.items()}
        if family.joint:  # an MM-DiT (SD3, Flux, ...): joint attention
            router = Router(controller, prompts, pipe if unet is not pipe else None)
            routed, on_call = install_joint(unet, router, originals, family)
        else:
            layers = {name: layer_info(unet, name) for name in originals}
            levels = tuple(sorted({i.level for i in layers.values() if i.is_cross and i.level is not None}))
            router = Router(controller, prompts, pipe if unet is not pipe else None, levels)
            routed = {name: RoutedProcessor(router, layers[name], proc) for name, proc in originals.items()}
            on_call = _on_unet_call(router)
        _set_processors(unet, modules, routed)
        hook = unet.register_forward_pre_hook(on_call, with_kwargs=True)
        try:
            yield router
        finally:
            hook.remove()
            _set_processors(unet, modules, originals)


def _set_processors(net, modules: dict | None, processors: dict) -> None:
    """Put processors in their modules' slots: diffusers' `set_attn_processor`, or each listed module's own."""
    if modules is None:
        net.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it is given
        return
    for key, processor in processors.items():
        modules[key].set_processor(processor)
