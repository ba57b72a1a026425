"""MM-DiT joint attention (SD3 / SD3.5, Flux.1, Flux.2 [klein] and [dev], Qwen-Image, Z-Image) routed through the same
controllers as the UNet's layers.

In an MM-DiT, image and text tokens attend jointly: one softmax over the image and the text keys (SD3 and Z-Image:
image tokens then text; Flux and Qwen-Image: text then image, in their double-stream blocks; Flux's single-stream
blocks get text and image already concatenated). Each attention module is seen as two sites: its image-to-text block
(`is_cross`, what a word's map and a Prompt-to-Prompt replacement act on) and its image-to-image block
(self-attention). `JointRoutedProcessor` is installed in the processor slot of every attention module the family
routes (by `attention.control`); what differs per family (the projections of its stock processors, the layout of its
sequence, its padding mask, the grid, which rows of a call are conditional) comes from its `families.Family`. It:

- calls the original processor unchanged (its fused kernel / attention dispatcher) where the controller wants neither,
  and on the unconditional call of a family that runs guidance as separate calls;
- where the controller wants a block, runs the fused attention once and takes each query's softmax denominator from
  the kernel itself (or, where the kernel cannot give it, from a plain softmax or an extra value channel that is 1 on
  text keys); with the conditional rows' image queries scored against the keys read (the text keys for the
  image-to-text block, every key when the image-to-image block is wanted too; no (tokens x tokens) matrix is formed)
  that gives the blocks of the joint softmax, exactly. A replacement C' of a block changes the image queries' output
  by (C' - C) @ V over its keys.

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
    caller then falls back (`JointRoutedProcessor._controlled`)."""
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
    if lse.shape[-1] != query.shape[2]:
        lse = lse[..., : query.shape[2]]  # the memory-efficient kernel pads its statistics' length
    if tuple(out.shape) != (*query.shape[:-1], value.shape[-1]) or tuple(lse.shape) != tuple(query.shape[:-1]):
        return None
    return out, lse if lse.dtype == torch.float32 else lse.float()


def _window(t: torch.Tensor, rows: slice, tokens: slice, keys: slice | None = None) -> torch.Tensor:
    """t[rows, :, tokens] (or t[rows, :, tokens, keys]) of a (batch, heads, tokens, channels) tensor as one view
    operation (indexing makes two per sliced dimension); a (batch, heads, tokens) tensor gives (rows, heads, tokens,
    1)."""
    sb, sh, st, sc = t.stride() if t.dim() == 4 else (*t.stride(), 1)
    keys = slice(0, t.shape[3] if t.dim() == 4 else 1) if keys is None else keys
    return t.as_strided((rows.stop - rows.start, t.shape[1], tokens.stop - tokens.start, keys.stop - keys.start),
                        (sb, sh, st, sc), t.storage_offset() + rows.start * sb + tokens.start * st + keys.start * sc)


def _folded(t: torch.Tensor, scale: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    """(n, heads, tokens, channels) -> (n * heads, tokens, channels), or (n * heads, channels, tokens) transposed, for
    one batched product; times `scale` (0-d) if given. A view where the heads of one row fold with any strides, else
    one copy into a new contiguous tensor (the scale riding on it)."""
    n, heads, tokens, channels = t.shape
    sb, sh, st, sc = t.stride()
    if n == 1 or sb == heads * sh:  # one row, or rows whose heads follow each other in memory: a view
        size, stride = (n * heads, tokens, channels), (sh, st, sc)
        folded = t.as_strided(size if not transposed else (size[0], channels, tokens),
                              stride if not transposed else (sh, sc, st), t.storage_offset())
        return folded if scale is None else torch.mul(folded, scale)
    source = t if not transposed else t.as_strided((n, heads, channels, tokens), (sb, sh, sc, st), t.storage_offset())
    if torch.is_grad_enabled() and t.requires_grad:  # autograd takes no out= arguments
        source = source if scale is None else source * scale
        return source.reshape(n * heads, *source.shape[2:])
    copy = torch.empty(source.shape, dtype=t.dtype, device=t.device)  # (n, heads, tokens or channels, ...)
    if scale is None:
        copy.copy_(source)
    else:
        torch.mul(source, scale, out=copy)
    return copy.view(n * heads, *copy.shape[2:])


def joint_layers(name: str, module, family: Family) -> tuple[LayerInfo, LayerInfo]:
    """(text site, image site) of one attention module of an MM-DiT."""
    parts = name.split(".")
    block = next((int(p) for p in parts[1:] if p.isdigit()), 0)  # "single_transformer_blocks.3.attn": 3;
    # "mode_blocks.image.2.attn" (a block list per token mode, Flux.3): 2
    place = family.place(name)
    heads = int(module.heads)
    return (LayerInfo(f"{name}:text", place, block, True, heads, 0), LayerInfo(f"{name}:image", place, block, False,
                                                                               heads, 0))


def install(net, router: Router, originals: dict, family: Family):
    """(processors, forward pre-hook) routing every attention module of an MM-DiT through the router."""
    router.conditional_first = family.conditional_first
    routed = {name: JointRoutedProcessor(router, name, net.get_submodule(name.removesuffix(".processor")), proc,
                                         family) for name, proc in originals.items()}
    return routed, _on_transformer_call(router, family)


def _on_transformer_call(router: Router, family: Family):
    """The MM-DiT's forward pre-hook: its image-token grid (the family's `grid`), the text length, which call of the
    step this is (a family that runs guidance as separate calls: the conditional call first, the others pass the
    controller by), and the run's shapes when they change."""
    cache: dict = {}

    def hook(module, args, kwargs):
        sample, batch, router.text_tokens = family.inputs(args, kwargs, router.prompts)
        if family.guidance_calls:
            router.passive = router.calls > 0  # the unconditional call(s) of this step
            router.calls += 1
            if router.passive:
                return
        latent, grid = family.grid(module, sample, kwargs, cache)
        run = router.run
        if run is None or run.grid != grid or run.batch != batch:
            prompts = (router.prompts or batch) if family.guidance_calls else router.prompts_in(batch)
            router.start(RunInfo(latent, prompts, batch, sample.device, sample.dtype, router.loop_length(),
                                 (max(grid),), grid, family.packed))

    return hook


class JointRoutedProcessor:
    """Calls the original joint-attention processor, or computes the joint attention with the controller in it."""

    def __init__(self, router: Router, name: str, module, original, family: Family):
        import inspect

        self.router = router
        self.text, self.image = joint_layers(name, module, family)
        self.original = original
        self.family = family
        # the family's projections are restated (by its adapter) only for its stock processors
        self.stock = type(original).__name__ in family.processors
        self._pads = None  # (layout, zero channels, text marker) for the fused call, made once per layout
        self._scales, self._scales_of = None, None  # the softmax scale as a tensor, and its value
        # the original's own signature: the arguments are bound by name only where the controller wants the call
        # (each module class passes them positionally in its own order), and the model's check of which keyword
        # arguments its processor takes still sees the original's
        self._signature = inspect.signature(original.__call__)

        def call(*args, **kwargs):
            return self._call(*args, **kwargs)

        call.__signature__ = self._signature
        self.__call__ = call

    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, *args, **kwargs)

    def _call(self, attn, *args, **kwargs):
        router, controller = self.router, self.router.controller
        if router.passive:  # an unconditional call of a family that runs guidance as separate calls
            return self.original(attn, *args, **kwargs)
        run = router.run
        place = self.text.place
        has_text = place == "joint" or (place == "single" and router.text_tokens > 0)
        grid = run.grid if run else (1, 1)
        text_site = Site(self.text, grid, router.step) if has_text else None
        image_site = Site(self.image, grid, router.step)
        want_text = text_site is not None and controller.wants(text_site)
        want_image = controller.wants(image_site)
        if not (want_text or want_image):
            return self.original(attn, *args, **kwargs)
        if not self.stock:
            raise P2PError(f"the layer {self.image.name.rsplit(':', 1)[0]} uses {type(self.original).__name__}; "
                           f"attention control supports diffusers' {', '.join(self.family.processors)} on "
                           f"{self.family.title}")
        call = self._signature.bind(attn, *args, **kwargs).arguments
        unknown = [k for k, v in call.items() if k not in self.family.arguments and v is not None and v != {}]
        if unknown:
            raise P2PError(f"{type(self.original).__name__} was given arguments attention control does not know: "
                           f"{', '.join(unknown)}")
        query, key, value, text, image = self.family.project(attn, call, router.text_tokens, grid)
        if call.get("attention_mask") is not None and "_key_mask" not in call:
            raise P2PError(f"{type(self.original).__name__} was given an attention mask, which attention control on "
                           f"{self.family.title} does not know")
        mask = call.get("_key_mask")  # (batch, tokens) bool, False on padded keys; None: every key counts
        out = self._controlled(query, key, value, text, image, text_site if want_text else None,
                               image_site if want_image else None, mask)
        out = out if out.dtype == query.dtype else out.to(query.dtype)
        batch, heads, length, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (batch, tokens, heads * head_dim)
        return self.family.finish(attn, out, call, text, image)

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

    def _controlled(self, query, key, value, text: slice, image: slice, text_site: Site | None,
                    image_site: Site | None, mask=None):
        """Fused attention plus the blocks of the joint softmax the controller wants, without the (tokens x tokens)
        matrix: the image queries' rows over the text keys (`text_site`) or over every key (`image_site` too).

        A block is exp(scores - logsumexp), where the logsumexp of each query's joint softmax is the fused kernel's
        own statistic (`attention_with_lse`: one call for the whole batch, the stock call's cost); only the
        conditional rows' image queries are scored. Where the kernel cannot give it (gradients on, as in training;
        another device; masked keys), rows over every key are a plain softmax beside the fused call, and rows over
        the text keys alone take the text's share of the softmax from an extra value channel that is 1 on the text
        keys (`mask`: (batch, tokens) bool, False on padded keys). A controller's change of the blocks moves the
        image queries' output by (new - old) @ V over the same keys; the text queries' rows are never changed.

        Written for few operations (each is a kernel launch on a GPU): the parts of the batch are single strided
        views (`_window`), heads fold into the batch of one product (`_folded`), the scale rides on the queries'
        copy, and the change of the output is added into the kernel's own output.

        The queries may be fewer than the keys: then they are the sequence's last tokens (a family whose earlier
        tokens' outputs are cached or computed apart, Qwen-Image 2.1), and `text` and `image` index the keys."""
        batch, heads, length, head_dim = value.shape
        shift = length - query.shape[2]  # the queries are the keys' last tokens
        if shift < 0 or image.start < shift:
            raise P2PError(f"attention control needs the image tokens among the queries; {query.shape[2]} queries "
                           f"for {length} keys, image tokens {image.start}-{image.stop}")
        queried = slice(image.start - shift, image.stop - shift)  # the image tokens among the queries
        rows = self.router.rows(batch)  # the conditional rows (the unconditional ones: nothing to read)
        keys = slice(0, length) if image_site is not None else text  # the columns read
        prompts, images, width = rows.stop - rows.start, image.stop - image.start, keys.stop - keys.start
        scale = 1 / math.sqrt(head_dim)
        # (prompts * heads, image, keys): the conditional rows' image queries scored against the keys read, scaled
        scores = torch.bmm(_folded(_window(query, rows, queried), self._scale(scale, query)),
                           _folded(_window(key, rows, keys), transposed=True)).view(prompts, heads, images, width)
        if mask is not None:  # padded text keys: no attention
            scores = scores.masked_fill(~mask[rows, None, None, keys], -math.inf)
        fast = None if (torch.is_grad_enabled() and query.requires_grad) or mask is not None else \
            attention_with_lse(query, key, value, scale)
        if fast is not None:
            out, lse = fast  # (batch, heads, tokens, head_dim), (batch, heads, tokens) float32
            lse = _window(lse, rows, queried)  # (prompts, heads, image, 1)

            def blocks() -> torch.Tensor:  # (prompts, heads, image, keys), float32 whatever the model's precision
                return torch.sub(scores, lse).exp_()
        elif width == length:  # every key: the image queries' whole rows of the joint softmax
            out = F.scaled_dot_product_attention(query, key, value, scale=scale,
                                                 attn_mask=None if mask is None else mask[:, None, None, :])

            def blocks() -> torch.Tensor:
                return torch.softmax(scores, -1, dtype=torch.float32)
        else:
            # The fused CPU / CUDA kernels need one head size for queries, keys and values: queries and keys get zero
            # channels (their dot products do not change), values the marker and zeros, 8 channels in all (keeping
            # the head size a multiple of 8); the softmax scale stays the real head size's.
            zeros, marker = self._padding(value, text, 8)
            fused = F.scaled_dot_product_attention(
                torch.cat([query, zeros.expand(batch, heads, query.shape[2], -1)], -1),
                torch.cat([key, zeros.expand(batch, heads, length, -1)], -1),
                torch.cat([value, marker.expand(batch, heads, -1, -1)], -1), scale=scale,
                attn_mask=None if mask is None else mask[:, None, None, :])
            out = fused[..., :head_dim]  # (batch, heads, tokens, head_dim)
            mass = fused[rows, :, queried, head_dim:head_dim + 1]  # (prompts, heads, image, 1): attention on the text

            def blocks() -> torch.Tensor:
                return torch.softmax(scores, -1, dtype=torch.float32) * mass

        probs = blocks()
        new, written = probs, False  # the blocks as the controller leaves them; whether written into in place
        controller = self.router.controller
        for site, columns in ((text_site, text), (image_site, image)):
            if site is None:
                continue
            whole = columns == keys
            block = new if whole else _window(new, slice(0, prompts), slice(0, images),
                                              slice(columns.start - keys.start, columns.stop - keys.start))
            changed = controller.attention(block, site)
            if changed is None:
                continue
            if changed is block:
                written = True
            elif whole:
                new = changed
            else:
                block.copy_(changed)
                written = True
        if new is probs and not written:
            return out
        # the output moves by (new - old) @ V over the keys read
        old = blocks() if written else probs  # blocks a controller wrote into: made again
        change = new - old if old is probs or torch.is_grad_enabled() else torch.sub(new, old, out=old)
        change = change if change.dtype == value.dtype else change.to(value.dtype)
        change = change if change.is_contiguous() else change.contiguous()  # a controller's own layout
        moved = torch.bmm(change.view(prompts * heads, images, width), _folded(_window(value, rows, keys)))
        out = out.clone() if out.requires_grad else out
        _window(out, rows, queried).add_(moved.view(prompts, heads, images, head_dim))
        return out

    def _scale(self, scale: float, like: torch.Tensor) -> torch.Tensor:
        """The softmax scale as a 0-d float32 tensor on the tensor's device, made once (a Python number would be
        wrapped into a tensor on every call). A 0-d tensor does not change the product's dtype, and the product is
        computed in float32 before its rounding to a half-precision model's, so the scale itself is never rounded."""
        if self._scales is None or self._scales.device != like.device or self._scales_of != scale:
            self._scales, self._scales_of = torch.tensor(scale, dtype=torch.float32, device=like.device), scale
        return self._scales
