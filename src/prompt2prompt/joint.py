"""MM-DiT joint attention (SD3 / SD3.5, Flux.1) routed through the same controllers as the UNet's layers.

In an MM-DiT, image and text tokens attend jointly: one softmax over the image and the text keys (SD3: image tokens
then text; Flux: text then image, in its double-stream blocks; its single-stream blocks get text and image already
concatenated). Each attention module is seen as two sites: its image-to-text block (`is_cross`, what a word's map and
a Prompt-to-Prompt replacement act on) and its image-to-image block (self-attention). `JointRoutedProcessor` is
installed in diffusers' processor slot of every attention module (by `attention.control`) and:

- calls the original processor unchanged (its fused kernel / attention dispatcher) where the controller wants neither;
- where only the image-to-text block is wanted, runs one fused attention whose values carry an extra channel that is 1
  on text keys, which gives each query's total attention on the text; with a softmax over the text keys alone (queries
  x text keys: no (tokens x tokens) matrix is ever formed) that is the image-to-text block of the joint softmax,
  exactly. A replacement C' of that block changes the image queries' output by (C' - C) @ V_text;
- where the image-to-image block is wanted too, computes the joint attention explicitly (small maps only).

The text queries' rows are never changed: an edit acts on what the image attends to, as in the UNet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import P2PError
from .families import Family
from .routing import LayerInfo, Router, RunInfo, Site

JOINT_PLACES = ("joint", "single")  # places whose cross site is a block of a joint softmax


def attention_with_lse(query, key, value, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output, logsumexp) of softmax attention from the fused kernel itself: output as scaled_dot_product_attention's,
    logsumexp (batch, heads, queries) float32, the log of each query's softmax denominator. Inference only (the
    kernels give no gradient through the logsumexp). None where this torch has no such kernel for these tensors: the
    caller then falls back to a marker channel (`JointRoutedProcessor._text_only`)."""
    device = query.device.type
    try:
        if device == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, False, attn_mask=None, scale=scale)[:2]
        elif device == "cuda" and query.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, False, False, scale=scale)[:2]
        elif device == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, None, True, 0.0, False, scale=scale)[:2]
        else:
            return None
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return None
    lse = lse[..., : query.shape[2]]  # the memory-efficient kernel pads its statistics' length
    if tuple(out.shape) != (*query.shape[:-1], value.shape[-1]) or tuple(lse.shape) != tuple(query.shape[:-1]):
        return None
    return out, lse.float()


def joint_layers(name: str, module) -> tuple[LayerInfo, LayerInfo]:
    """(text site, image site) of one attention module of an MM-DiT."""
    parts = name.split(".")
    block = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if parts[0].startswith("single"):
        place = "single"  # Flux single-stream: text and image concatenated before attention
    elif parts[2:3] == ["attn2"]:
        place = "image"  # SD3.5's second (image-only) attention of a dual-attention block
    else:
        place = "joint"
    heads = int(module.heads)
    return (LayerInfo(f"{name}:text", place, block, True, heads, 0), LayerInfo(f"{name}:image", place, block, False,
                                                                               heads, 0))


def install(net, router: Router, originals: dict, family: Family):
    """(processors, forward pre-hook) routing every attention module of an MM-DiT through the router."""
    routed = {name: JointRoutedProcessor(router, name, net.get_submodule(name.removesuffix(".processor")), proc,
                                         family) for name, proc in originals.items()}
    return routed, _on_transformer_call(router, family)


def _on_transformer_call(router: Router, family: Family):
    """The MM-DiT's forward pre-hook: its image-token grid (SD3: latents / patch; Flux: from its image ids) and the
    text length, and the run's shapes when they change."""

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]
        text = kwargs.get("encoder_hidden_states")
        router.text_tokens = 0 if text is None else text.shape[1]
        batch = sample.shape[0]
        if not family.packed:  # SD3: (batch, channels, h, w) latents, patchified inside
            patch = module.config.patch_size
            latent = tuple(sample.shape[2:])
            grid = (latent[0] // patch, latent[1] // patch)
        else:  # Flux: (batch, tokens, channels) packed latents; img_ids hold each token's (0, row, column)
            ids = kwargs["img_ids"]
            if router.ids is None or router.ids[0] is not ids:  # read once: one tensor every step
                router.ids = (ids, (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1))
            grid = router.ids[1]
            latent = grid
        run = router.run
        if run is None or run.grid != grid or run.batch != batch:
            router.start(RunInfo(latent, router.prompts_in(batch), batch, sample.device, sample.dtype,
                                 router.loop_length(), (max(grid),), grid, family.packed))

    return hook


class JointRoutedProcessor:
    """Calls the original joint-attention processor, or computes the joint attention with the controller in it."""

    def __init__(self, router: Router, name: str, module, original, family: Family):
        self.router = router
        self.text, self.image = joint_layers(name, module)
        self.original = original
        self.family = family
        # the family's projections are restated below only for its stock processors (None: another processor)
        self.kind = family.name if type(original).__name__ in family.processors else None
        self.text_first = family.text_first
        self._pads = None  # (layout, zero channels, text marker) for the fused call, made once per layout
        self._zeros = None

        def call(*args, **kwargs):
            return self._call(*args, **kwargs)

        import inspect

        call.__signature__ = inspect.signature(original.__call__)  # keyword arguments the original takes pass through
        self.__call__ = call

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kw):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kw)

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kw):
        if args and self.kind == "flux":  # FluxAttention.forward passes the rotary embedding positionally
            kw["image_rotary_emb"], args = args[0], args[1:]
        router, controller = self.router, self.router.controller
        run = router.run
        grid = run.grid if run else (1, hidden_states.shape[1])
        has_text = encoder_hidden_states is not None or (self.text.place == "single" and router.text_tokens > 0)
        text_site = Site(self.text, grid, router.step) if has_text else None
        image_site = Site(self.image, grid, router.step)
        want_text = text_site is not None and controller.wants(text_site)
        want_image = controller.wants(image_site)
        if not (want_text or want_image):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kw)
        if args:
            raise P2PError(f"{type(self.original).__name__} was given arguments attention control does not know")
        if self.kind is None:
            raise P2PError(f"the layer {self.image.name.rsplit(':', 1)[0]} uses {type(self.original).__name__}; "
                           f"attention control supports diffusers' {', '.join(self.family.processors)} on "
                           f"{self.family.title}")
        if attention_mask is not None:
            raise P2PError("joint attention with an attention mask cannot be controlled")
        query, key, value, text, image = self._project(attn, hidden_states, encoder_hidden_states, kw)
        if want_image:
            out = self._explicit(query, key, value, text, image, text_site if want_text else None, image_site)
        else:
            out = self._text_only(query, key, value, text, image, text_site)
        out = out if out.dtype == query.dtype else out.to(query.dtype)
        return self._finish(attn, out, hidden_states, encoder_hidden_states, text, image)

    # -- the original processors' projections --------------------------------------------------------------------
    def _project(self, attn, hidden_states, encoder_hidden_states, kw):
        """query, key, value as (batch, heads, tokens, head_dim) and the text and image slices of the sequence."""
        batch = hidden_states.shape[0]
        if self.kind == "sd3":
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            head_dim = key.shape[-1] // attn.heads
            query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            n = query.shape[2]
            if encoder_hidden_states is None:  # SD3.5's image-only attention
                return query, key, value, slice(n, n), slice(0, n)
            eq, ek, ev = (proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            t = eq.shape[2]
            return (torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2), slice(n, n + t),
                    slice(0, n))
        # Flux: diffusers' own projection helper (it knows fused projections), sequence dimension 1
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            t = eq.shape[1]
        else:
            t = self.router.text_tokens if self.text.place == "single" else 0
        rotary = kw.get("image_rotary_emb")
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        length = query.shape[1]
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
        return query, key, value, slice(0, t), slice(t, length)

    def _finish(self, attn, out, hidden_states, encoder_hidden_states, text: slice, image: slice):
        """The original processors' output projections and return values."""
        batch, heads, length, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (batch, tokens, heads * head_dim)
        if self.kind == "sd3":
            if encoder_hidden_states is None:
                return attn.to_out[1](attn.to_out[0](out))
            image_out, text_out = out[:, image], out[:, text]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
            return attn.to_out[1](attn.to_out[0](image_out)), text_out
        if encoder_hidden_states is None:  # Flux single-stream: the block projects it itself
            return out
        image_out = attn.to_out[1](attn.to_out[0](out[:, image].contiguous()))
        return image_out, attn.to_add_out(out[:, text].contiguous())

    # -- attention with the controller in it ---------------------------------------------------------------------
    def _padding(self, value: torch.Tensor, text: slice, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(zeros (1, 1, 1, pad), marker (1, 1, tokens, pad): 1 in its first channel on the text keys, 0 elsewhere),
        made once per sequence layout and kept (no per-call fill, no host read)."""
        key = (value.shape[2], text.start, text.stop, pad, value.dtype, value.device)
        if self._pads is None or self._pads[0] != key:
            marker = torch.zeros(1, 1, value.shape[2], pad, dtype=value.dtype, device=value.device)
            marker[:, :, text, 0] = 1
            self._pads = (key, torch.zeros(1, 1, 1, pad, dtype=value.dtype, device=value.device), marker)
        return self._pads[1], self._pads[2]

    def _text_only(self, query, key, value, text: slice, image: slice, site: Site):
        """Fused attention plus the image-to-text block of the joint softmax, without the (tokens x tokens) matrix.

        The block is exp(scores - logsumexp) over the text keys, where the logsumexp of each query's joint softmax is
        the fused kernel's own statistic (`attention_with_lse`: one call for the whole batch, the stock call's cost).
        Where the kernel cannot give it (gradients on, as in training; another device), the values carry an extra
        channel that is 1 on the text keys, so the fused kernel returns each query's total attention on the text,
        and the block is a softmax over the text keys times that share."""
        batch, heads, length, head_dim = value.shape
        free = batch - self.router.conditional(batch)  # unconditional rows: nothing to read
        prompts, scale = batch - free, 1 / math.sqrt(head_dim)
        # image x text scores of the conditional rows; heads fold into the batch as views (the sequence slices keep a
        # uniform batch stride), so the product is one bmm
        scores = torch.baddbmm(self._zero(query), query[free:, :, image].flatten(0, 1),
                               key[free:, :, text].flatten(0, 1).transpose(1, 2), beta=0,
                               alpha=scale).view(prompts, heads, -1, text.stop - text.start)
        fast = None if torch.is_grad_enabled() and query.requires_grad else \
            attention_with_lse(query, key, value, scale)
        if fast is not None:
            out, lse = fast  # (batch, heads, tokens, head_dim), (batch, heads, tokens) float32
            lse = lse[free:, :, image, None]

            def text_block() -> torch.Tensor:  # (prompts, heads, image, text), float32 whatever the model's precision
                return torch.exp(scores.float() - lse)
        else:
            # The fused CPU / CUDA kernels need one head size for queries, keys and values: queries and keys get zero
            # channels (their dot products do not change), values the marker and zeros, 8 channels in all (keeping
            # the head size a multiple of 8); the softmax scale stays the real head size's.
            zeros, marker = self._padding(value, text, 8)
            zeros = zeros.expand(batch, heads, length, -1)
            fused = F.scaled_dot_product_attention(
                torch.cat([query, zeros], -1), torch.cat([key, zeros], -1),
                torch.cat([value, marker.expand(batch, heads, -1, -1)], -1), scale=scale)
            out = fused[..., :head_dim]  # (batch, heads, tokens, head_dim)
            mass = fused[free:, :, image, head_dim:head_dim + 1]  # (prompts, heads, image, 1): attention on the text

            def text_block() -> torch.Tensor:  # (prompts, heads, image, text), float32 whatever the model's precision
                return torch.softmax(scores, -1, dtype=torch.float32) * mass

        block = text_block()
        new = self.router.controller.attention(block, site)
        if new is not None:  # the output moves by (new - old) @ V_text
            old = text_block() if new is block else block  # a controller that wrote into the block: made again
            change = new - old
            change = change if change.dtype == value.dtype else change.to(value.dtype)
            out = out.clone() if out.requires_grad else out
            out[free:, :, image].add_(torch.bmm(change.flatten(0, 1), value[free:, :, text].flatten(0, 1)).view(
                prompts, heads, -1, head_dim))
        return out

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-d zero on the tensor's device and dtype (baddbmm's ignored addend), made once."""
        if self._zeros is None or self._zeros.dtype != like.dtype or self._zeros.device != like.device:
            self._zeros = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._zeros

    def _explicit(self, query, key, value, text: slice, image: slice, text_site: Site | None, image_site: Site):
        """The joint attention with the probabilities materialised (batch, heads, tokens, tokens), one product for
        the whole batch (small grids only); the controller sees the conditional rows' blocks."""
        batch, head_dim = query.shape[0], query.shape[-1]
        free = batch - self.router.conditional(batch)
        scores = torch.matmul(query * (1 / math.sqrt(head_dim)), key.transpose(-1, -2))
        probs = torch.softmax(scores, -1, dtype=torch.float32)  # float32 whatever the model's precision
        controller = self.router.controller
        for site, columns in ((text_site, text), (image_site, image)):
            if site is None:
                continue
            block = probs[free:, :, image, columns]
            new = controller.attention(block, site)
            if new is not None and new is not block:
                probs[free:, :, image, columns] = new.to(probs.dtype)
        return torch.matmul(probs if probs.dtype == value.dtype else probs.to(value.dtype), value)
