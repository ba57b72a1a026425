"""`attend`: generate while recording attention, and the result object that turns the recording into maps."""

from __future__ import annotations

from dataclasses import dataclass

from .concepts import ConceptMaps, ConceptOptions, ConceptRecorder
from .errors import InputError, P2PError
from .generation import Generation, GenerationOptions, generate
from .loading import default_part, family, model_name
from .maps import CrossAttentionMaps, SelfAttentionMaps, cross_maps, self_maps
from .routing import AttentionController, Controllers, exclusive
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens, batch_tokens


@dataclass
class AttendResult:
    generation: Generation
    store: AttentionStore
    prompts: list[PromptTokens]
    settings: dict  # prompt(s), model, family, seed, steps, guidance, size (and concepts, where asked)
    concepts: ConceptRecorder | None = None  # the concept stream's record (attend(..., concepts=[...]))

    @property
    def images(self):
        return self.generation.images

    def maps(self, res: int | tuple[int, ...] | None = None, places: tuple[str, ...] | None = None,
             heads: tuple[int, ...] | None = None) -> CrossAttentionMaps:
        """Per-token cross-attention, averaged over the chosen map sides, places and heads (default: all)."""
        return cross_maps(self.store, self.prompts, res, places, heads, self.settings)

    def self_maps(self, res: int | None = None) -> SelfAttentionMaps:
        return self_maps(self.store, res)

    def concept_maps(self, kind: str = "output") -> ConceptMaps:
        """The concepts' maps (MM-DiTs; `concepts.py`): "output", ConceptAttention's output-space maps, or "cross",
        its cross-attention variant; a share per concept at each image token."""
        if self.concepts is None:
            raise InputError("no concepts were named: pass attend(..., concepts=['circle', ...])")
        return ConceptMaps(self.concepts.maps(kind), self.concepts.concepts, kind, self.settings)

    def _repr_png_(self) -> bytes:
        from .display import attend_picture, png

        return png(attend_picture(self))

    def __repr__(self) -> str:
        s = self.settings
        return (f"AttendResult({s['prompts']!r}, {s['width']}x{s['height']}, {s['steps']} steps, guidance "
                f"{s['guidance']:g}, {len(self.store.sums)} layers recorded)")


class _SidesCheck(AttentionController):
    """Refuses map sides the model does not have as soon as the first step has shown its sides (not after the whole
    generation). It notes each cross-attention call's side in `wants` and asks for no probabilities, so it costs
    nothing; it must come first in `Controllers` (which stops asking at the first controller that wants a call)."""

    def __init__(self, res: tuple[int, ...]):
        self.res, self.seen = res, set()

    def wants(self, site) -> bool:
        if site.step == 0 and site.layer.is_cross:
            self.seen.add(max(site.res))
        return False

    def step_end(self, step, timestep, latents):
        missing = [side for side in self.res if side not in self.seen]
        if step == 0 and missing:
            raise P2PError(f"this model has no cross-attention maps {missing[0]} positions a side at this image size; "
                           f"its maps are {', '.join(map(str, sorted(self.seen)))} a side (choose res among them)")
        return None


def attend(
    pipe,
    prompts: str | list[str],
    options: GenerationOptions = GenerationOptions(),
    record: RecordOptions = RecordOptions(),
    model: str = "",
    progress: bool = True,
    res: int | tuple[int, ...] | None = None,
    concepts: ConceptOptions | list[str] | tuple[str, ...] | None = None,
) -> AttendResult:
    """Generate one image per prompt (shared initial latent) and record cross- and self-attention on the way.
    res: map sides the caller will ask for; a side the model does not have is refused after the first step.
    concepts: words whose concept maps to draw as well (MM-DiTs; `result.concept_maps()`), or ConceptOptions; the
    image is the same with or without them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    options = options.resolved(pipe)  # what was used goes into the settings
    tokens = batch_tokens(pipe, prompts, options.max_sequence_length)
    store = AttentionStore(record)
    sides = (res,) if isinstance(res, int) else tuple(res or ())
    controller = Controllers(_SidesCheck(sides), store) if sides else store
    if concepts is None:
        gen, recorder = generate(pipe, prompts, controller, options, progress=progress), None
    else:
        if not isinstance(concepts, ConceptOptions):
            concepts = ConceptOptions(tuple([concepts] if isinstance(concepts, str) else concepts))
        with exclusive(pipe):  # the stream's hooks see this generation only
            with ConceptRecorder(pipe, concepts, len(prompts), options.steps) as recorder:
                gen = generate(pipe, prompts, controller, options, progress=progress)
    width, height = gen.images[0].size
    settings = {
        "prompts": prompts,
        "model": model_name(pipe, model),
        "family": family(pipe),
        "text_part": default_part(pipe),
        **options.to_dict(),
        "height": height,
        "width": width,
        "record": {k: v for k, v in vars(record).items()},
    }
    if recorder is not None:
        settings["concepts"] = {"concepts": list(recorder.concepts), "blocks": sorted(recorder.chosen),
                                "steps": list(recorder.window), "method": "ConceptAttention (arXiv 2502.04320)"}
    return AttendResult(gen, store, tokens, settings, recorder)

