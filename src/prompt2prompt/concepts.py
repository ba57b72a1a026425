"""Concept maps on MM-DiTs: where a named concept is in the picture, read in the joint attention's output space.

ConceptAttention (Helbling et al., ICML 2025, arXiv 2502.04320): each concept (a word the user names: "circle",
"square", "background"), encoded alone by the model's own text encoder, travels as one extra token through the joint
blocks, with the text stream's projections, modulation and feed-forward. The attention is one-directional: a concept
token's query attends to the image keys and to the concept keys, and no image or prompt token ever attends to a
concept, so the generated image is exactly the image without concepts (here: the concept stream runs beside each
block, in a forward pre-hook that reads the block's inputs and changes nothing). In each chosen block, the map is the
dot product of every image token's attention output (before the output projection, heads side by side) with every
concept's, averaged over the chosen blocks and steps and softmaxed over the concepts: at each pixel the concepts'
shares sum to 1. The paper's cross-attention variant (image queries against concept keys, averaged over heads) is
kept beside it, computed the same way (`kind="cross"`).

What differs per family is the family's `concepts` adapter (`SD3Concepts` in `families/sd3.py`, and one in each
MM-DiT's adapter): `encode(pipe, concept)` the denoiser's text embedding of the concept alone, `blocks(net)` the
blocks the stream runs beside, `start(net, embeds)` the concepts as the first block's text side takes them, and
`step(block, call, rows, stream, read, grid)` one block of the stream from the block's bound inputs (the stream after
it and, if read, the block's maps). A family without one is refused in one sentence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InputError, PromptError
from .families import family_of
from .maps import HeatMap
from .routing import denoiser, exclusive

MAX_CONCEPTS = 32  # concepts per generation (each is one more token in every chosen block's attention)
KINDS = ("output", "cross")  # the output-space maps (the method) and the cross-attention variant


@dataclass(frozen=True)
class ConceptOptions:
    concepts: tuple[str, ...]  # the words whose maps are drawn, each encoded alone
    blocks: tuple[int, ...] | None = None  # joint blocks whose maps are averaged (indices into the family's joint
    # blocks); None: the family's default (`default_blocks`)
    steps: tuple[float, float] = (0.0, 1.0)  # the part of the loop whose steps are averaged, as fractions

    def __post_init__(self):
        concepts = self.concepts
        if isinstance(concepts, str) or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise PromptError(f"expected concepts as a list of words, got {concepts!r}")
        if not concepts:
            raise InputError("expected at least one concept (a word such as 'circle'), got none")
        if len(concepts) > MAX_CONCEPTS:
            raise InputError(f"expected at most {MAX_CONCEPTS} concepts, got {len(concepts)}")
        object.__setattr__(self, "concepts", tuple(concepts))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
        repeated = sorted({c for c in concepts if list(concepts).count(c) > 1})
        if repeated:
            raise InputError(f"each concept once: {', '.join(map(repr, repeated))} is named twice")
        lo, hi = self.steps
        if not 0 <= lo < hi <= 1:
            raise InputError(f"expected concept steps as fractions 0 <= start < end <= 1, got {lo:g} to {hi:g}")


def default_blocks(adapter, count: int) -> range:
    """The joint blocks a concept map averages when none are chosen, of the family's `count`: its adapter's last
    `last_blocks` where it names them (Flux.1: the last 4, the ConceptAttention code's default for Flux, its
    `layer_indices` 15 to 18 of Flux.1's 19 double-stream blocks, helblazer811/ConceptAttention
    `concept_attention/flux/pipeline.py`), else every one: the paper's defaults were set on Flux.1 only, and on our
    flow model every block measured better than either half (BENCHMARKS.md "Concept maps against word maps")."""
    last = adapter.last_blocks
    return range(count) if last is None else range(max(0, count - last), count)


def check_family(pipe) -> None:
    """An InputError that says why, where the pipeline's family has no concept stream."""
    family = family_of(pipe)
    if not family.joint:
        raise InputError(f"concept maps need an MM-DiT (joint attention over text and image tokens); {family.title} "
                         "has cross-attention layers: use its word maps (`maps().word(...)`)")
    if family.concepts is None:
        raise InputError(f"concept maps are built for {', '.join(supported())} so far; {family.title} has no concept "
                         "stream yet: use its word maps")


def concept_attention(q, k, v, image: slice, cq, ck, cv, read: bool, key_mask: torch.Tensor | None = None):
    """The concepts' attention in one block, and (if read) its maps, from the block's queries, keys and values
    (rows, heads, tokens, head_dim) of the image and prompt tokens (`image` their image tokens) and of the concepts:
    (concept outputs (rows, heads, concepts, head_dim), None or (output-space scores, cross-attention scores), each
    (rows, image tokens, concepts)). key_mask: (rows, tokens) bool, False on the padded keys the block masks out. The
    queries may be the keys' last tokens only (a step that reads the text's keys from a cache)."""
    # a concept attends to the image tokens and to the concepts; nothing attends to a concept
    c_out = F.scaled_dot_product_attention(cq, torch.cat([k[:, :, image], ck], 2), torch.cat([v[:, :, image], cv], 2))
    if not read:
        return c_out, None
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (rows, 1, 1, tokens)
    shift = k.shape[2] - q.shape[2]  # the queries are the keys' last tokens
    queries = q[:, :, image.start - shift : image.stop - shift]  # the image tokens'
    img_out = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask)  # the image tokens' own output
    rows, heads, tokens, d = img_out.shape
    output = img_out.transpose(1, 2).reshape(rows, tokens, heads * d) @ merge_heads(c_out).transpose(1, 2)
    cross = (queries @ ck.transpose(-1, -2)).mean(1) * d**-0.5  # image queries x concept keys, mean of heads
    return c_out, (output, cross)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(rows, heads, tokens, head_dim) -> (rows, tokens, heads * head_dim)."""
    return x.transpose(1, 2).flatten(2)


def text_side_update(block, stream, c_out, gate_msa, shift_mlp, scale_mlp, gate_mlp) -> torch.Tensor:
    """The concept tokens after a double-stream block, as the block updates a prompt token: the gated attention
    output through `to_add_out`, then the gated feed-forward `ff_context` on `norm2_context` (SD3's
    JointTransformerBlock and Flux's FluxTransformerBlock alike)."""
    stream = stream + gate_msa.unsqueeze(1) * block.attn.to_add_out(merge_heads(c_out))
    normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)


def supported() -> list[str]:
    from .families import FAMILIES

    return [f.title for f in FAMILIES.values() if f.concepts is not None]


def encode_concepts(pipe, concepts: tuple[str, ...]) -> torch.Tensor:
    """(concepts, text width): each concept encoded alone by the pipeline's text side, the mean of its own tokens
    (no start, end or padding token) in the part the family reads words from."""
    from .loading import default_part
    from .tokens import prompt_tokens

    adapter = family_of(pipe).concepts
    vectors = []
    for concept in concepts:
        tokens = prompt_tokens(pipe, concept)
        offset, part = tokens.part_of(default_part(pipe) if tokens.parts else None)
        positions = [offset + t for w in part.words for t in w.tokens]
        if not positions:
            raise PromptError(f"the concept {concept!r} gives no word token in this model's text: expected a word "
                              "its tokenizer reads")
        with torch.no_grad(), exclusive(pipe):
            embeds = adapter.encode(pipe, concept)  # (1, text tokens, width)
        vectors.append(embeds[0, positions].float().mean(0))
    return torch.stack(vectors)


class ConceptRecorder:
    """Runs the concept stream beside the denoiser's joint blocks while a generation runs; always detaches.

        with ConceptRecorder(pipe, options, prompts=2, steps=28) as rec:
            pipe(...)
        rec.maps("output")  # (prompts, h, w, concepts)

    Only the conditional rows of each call carry concepts (the unconditional image has no prompt to explain)."""

    def __init__(self, pipe, options: ConceptOptions, prompts: int, steps: int):
        check_family(pipe)
        self.family = family_of(pipe)
        self.concepts = tuple(options.concepts)
        self.adapter = self.family.concepts
        self.net = denoiser(pipe)
        self.blocks = self.adapter.blocks(self.net)
        chosen = default_blocks(self.adapter, len(self.blocks)) if options.blocks is None else options.blocks
        for i in chosen:
            if not 0 <= i < len(self.blocks):
                raise InputError(f"expected joint block indices from 0 to {len(self.blocks) - 1}, got {i}")
        self.chosen, self.prompts, self.steps = frozenset(chosen), prompts, steps
        lo, hi = options.steps
        self.window = (int(lo * steps), max(int(lo * steps) + 1, round(hi * steps)))
        self.embeds = encode_concepts(pipe, self.concepts)
        self.options = options
        self.calls, self.stream, self.grid, self._timestep = 0, None, None, None
        self.sums = {kind: None for kind in KINDS}  # (prompts, image tokens, concepts) float32
        self.reads = 0  # (block, step) maps in the sums
        self.last = max(self.chosen)  # the stream is not carried past the last chosen block
        self._hooks = []

    def __enter__(self) -> ConceptRecorder:
        self._hooks.append(self.net.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._on_block(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.stream = None

    def _rows(self, batch: int) -> slice:
        p = self.prompts
        if batch == p:
            return slice(0, p)
        if batch != 2 * p:
            raise InputError(f"expected {p} or {2 * p} rows per denoiser call, got {batch}")
        return slice(0, p) if self.family.conditional_first else slice(p, 2 * p)

    def _on_call(self, net, args, kwargs):
        sample, batch, _ = self.family.inputs(args, kwargs, None)
        self.stream = None
        if self.family.guidance_calls:  # guidance as separate calls, the conditional first: a call at the same
            # timestep as the previous one is that step's unconditional call, which carries no concepts
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            again = t is not None and self._timestep is not None and torch.equal(t, self._timestep)
            self._timestep = t
            if again:
                return None
        step, self.calls = self.calls, self.calls + 1
        self.rows = self._rows(batch)
        if not self.window[0] <= step < self.window[1]:
            return None  # a step whose maps are not read costs nothing
        _, self.grid = self.family.grid(net, sample, kwargs, {})
        with torch.no_grad():
            start = self.adapter.start(net, self.embeds.to(sample.device, sample.dtype))  # (concepts, width)
        self.stream = start[None].expand(self.rows.stop - self.rows.start, -1, -1)
        return None

    def _on_block(self, index: int):
        signature = inspect.signature(self.blocks[index].forward)

        def hook(block, args, kwargs):
            if self.stream is None:
                return None
            read = index in self.chosen
            call = signature.bind_partial(*args, **kwargs).arguments  # the block's inputs by name
            with torch.no_grad():
                self.stream, maps = self.adapter.step(block, call, self.rows, self.stream, read, self.grid)
            if read:
                self.reads += 1
                for kind, m in zip(KINDS, maps):  # (rows, image tokens, concepts)
                    m = m.float().cpu()
                    self.sums[kind] = m if self.sums[kind] is None else self.sums[kind] + m
            if index >= self.last:
                self.stream = None
            return None

        return hook

    def maps(self, kind: str = "output") -> torch.Tensor:
        """(prompts, h, w, concepts): the scores averaged over the chosen blocks and steps, softmaxed over the concepts
        at each image token."""
        if kind not in KINDS:
            raise InputError(f"expected a concept map kind among {', '.join(KINDS)}, got {kind!r}")
        total = self.sums[kind]
        if total is None:
            raise InputError("no concept map was recorded: no chosen block ran in the chosen steps")
        h, w = self.grid
        return torch.softmax(total / self.reads, dim=-1).reshape(total.shape[0], h, w, total.shape[-1])


@dataclass
class ConceptMaps:
    """Concept maps of a generation: a share per concept at each image token (they sum to 1 over the concepts)."""

    tensor: torch.Tensor  # (prompts, h, w, concepts) float32
    concepts: tuple[str, ...]
    kind: str = "output"  # "output": ConceptAttention's output-space maps; "cross": its cross-attention variant
    settings: dict = field(default_factory=dict)

    def concept(self, name: str, prompt: int = 0) -> HeatMap:
        if name not in self.concepts:
            raise PromptError(f"{name!r} is not one of the concepts ({', '.join(self.concepts)})")
        return HeatMap(self.tensor[prompt, :, :, self.concepts.index(name)], name)

    def all(self, prompt: int = 0) -> list[HeatMap]:
        return [self.concept(c, prompt) for c in self.concepts]

    def argmax(self, prompt: int = 0) -> torch.Tensor:
        """(h, w) index of the concept with the largest share at each image token."""
        return self.tensor[prompt].argmax(-1)

    def picture(self, prompt: int = 0, image=None, cell: int = 128):
        """Each concept's map (over the image, if given), labelled with its concept."""
        from .plot import grid

        heats = self.all(prompt)
        tiles = [h.overlay(image) if image is not None else h.image() for h in heats]
        prompts = self.settings.get("prompts") or []
        title = f"concept maps ({self.kind}): {prompts[prompt]}" if len(prompts) > prompt else "concept maps"
        return grid(([image] if image is not None else []) + tiles,
                    (["image"] if image is not None else []) + list(self.concepts), cell=cell, title=title)

    def argmax_picture(self, prompt: int = 0, size: int = 256):
        """The concept with the largest share at each image token, with a legend."""
        from .plot import argmax_image

        return argmax_image(self.argmax(prompt).numpy(), dict(enumerate(self.concepts)), size=size)

    def _repr_png_(self) -> bytes:
        from .display import png

        return png(self.picture())

    def __repr__(self) -> str:
        p, h, w, c = self.tensor.shape
        return f"ConceptMaps({self.kind}, {', '.join(self.concepts)}; {p} prompt(s), {h}x{w})"

    def save(self, path: str | Path) -> Path:
        """The maps and the settings that made them, as safetensors (settings as JSON metadata)."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"maps": self.tensor.contiguous()}, tmp, metadata={
            "concepts": json.dumps(list(self.concepts)), "kind": self.kind, "settings": json.dumps(self.settings)})
        tmp.replace(path)
        return path


DEFAULT_NOISE = 0.5  # noise level of an input image's one step: the ConceptAttention code's default for an image
# (`ConceptAttentionFluxPipeline.encode_image`: Flux schnell's unshifted 4-step schedule 1, 0.75, 0.5, 0.25 read at
# index 2, helblazer811/ConceptAttention `concept_attention/flux/pipeline.py` and `segmentation.py`)


@dataclass
class ImageConcepts:
    """Concept maps of an input image: the image as the model read it and its ConceptMaps."""

    image: object  # the prepared PIL image (cropped and resized to the size the model works at)
    maps: ConceptMaps  # the output-space maps (the method)
    cross: ConceptMaps  # the cross-attention variant

    def _repr_png_(self) -> bytes:
        from .display import png

        return png(self.maps.picture(0, self.image))

    def __repr__(self) -> str:
        return f"ImageConcepts({self.maps!r})"


def image_concepts(pipe, image, caption: str, concepts: ConceptOptions | list[str] | tuple[str, ...],
                   noise: float = DEFAULT_NOISE, seed: int = 0, height: int | None = None, width: int | None = None,
                   max_sequence_length: int | None = None, model: str = "") -> ImageConcepts:
    """Concept maps of an existing image (a path or a PIL image), as ConceptAttention reads a real image: its latent
    noised to `noise` (x = (1 - noise) * latent + noise * e, e seeded standard normal: the flow models' own
    interpolation), then one call of the denoiser under `caption`, without guidance, with the concept stream beside
    its blocks. Every chosen block is read at that one step (`concepts.steps` has no loop to choose from)."""
    from .flow import velocity
    from .generation import image_size_for
    from .images import prepare_image
    from .inversion.codec import encode, pack
    from .loading import model_name
    from .numbers import check_seed

    check_family(pipe)
    if not family_of(pipe).flow:  # every MM-DiT here samples by flow; the interpolation above assumes it
        raise InputError(f"concept maps of an image need a flow-matching model; {family_of(pipe).title} is not one")
    if not 0 < noise < 1:
        raise InputError(f"expected a noise level between 0 and 1 (exclusive), got {noise!r}")
    if not (caption or "").strip():
        raise PromptError("expected a caption of the image, got an empty one")
    check_seed(seed)
    if not isinstance(concepts, ConceptOptions):
        concepts = ConceptOptions(tuple([concepts] if isinstance(concepts, str) else concepts))
    notes: list[str] = []
    prepared = prepare_image(image, image_size_for(pipe, height, width), notes=notes, purpose="reading")
    with exclusive(pipe):
        latent = encode(pipe, prepared)  # (1, channels, h, w)
        v = velocity(pipe, caption, 1.0, max_sequence_length, tuple(latent.shape))
        x0 = pack(pipe, latent)
        e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(x0)
        with ConceptRecorder(pipe, replace(concepts, steps=(0.0, 1.0)), prompts=1, steps=1) as recorder:
            v((1 - noise) * x0 + noise * e, torch.tensor([noise * 1000.0]))
    settings = {"prompts": [caption], "model": model_name(pipe, model), "family": family_of(pipe).name,
                "size": list(prepared.size), "noise": noise, "seed": seed, "conversions": notes,
                "concepts": {"concepts": list(recorder.concepts), "blocks": sorted(recorder.chosen), "steps": [0, 1],
                             "method": "ConceptAttention (arXiv 2502.04320), one step of the noised image"}}
    return ImageConcepts(prepared, *(ConceptMaps(recorder.maps(kind), recorder.concepts, kind, settings)
                                     for kind in KINDS))
