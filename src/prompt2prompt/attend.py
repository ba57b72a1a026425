"""`attend`: generate while recording attention, and the result object that turns the recording into maps."""

from __future__ import annotations

from dataclasses import dataclass

from .generation import Generation, GenerationOptions, generate
from .loading import default_part, family
from .maps import CrossAttentionMaps, SelfAttentionMaps, cross_maps, self_maps
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens, batch_tokens


@dataclass
class AttendResult:
    generation: Generation
    store: AttentionStore
    prompts: list[PromptTokens]
    settings: dict  # prompt(s), model, family, seed, steps, guidance, size

    @property
    def images(self):
        return self.generation.images

    def maps(self, res: int | tuple[int, ...] | None = None, places: tuple[str, ...] | None = None,
             heads: tuple[int, ...] | None = None) -> CrossAttentionMaps:
        """Per-token cross-attention, averaged over the chosen map sides, places and heads (default: all)."""
        return cross_maps(self.store, self.prompts, res, places, heads, self.settings)

    def self_maps(self, res: int | None = None) -> SelfAttentionMaps:
        return self_maps(self.store, res)


def attend(
    pipe,
    prompts: str | list[str],
    options: GenerationOptions = GenerationOptions(),
    record: RecordOptions = RecordOptions(),
    model: str = "",
    progress: bool = True,
) -> AttendResult:
    """Generate one image per prompt (shared initial latent) and record cross- and self-attention on the way."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokens = batch_tokens(pipe, prompts, options.max_sequence_length)
    store = AttentionStore(record)
    gen = generate(pipe, prompts, store, options, progress=progress)
    width, height = gen.images[0].size
    settings = {
        "prompts": prompts,
        "model": str(model),
        "family": family(pipe),
        "text_part": default_part(pipe),
        **options.to_dict(),
        "height": height,
        "width": width,
        "record": {k: v for k, v in vars(record).items()},
    }
    return AttendResult(gen, store, tokens, settings)

