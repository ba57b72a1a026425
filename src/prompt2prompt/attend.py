"""`attend`: generate while recording attention, and the result object that turns the recording into maps."""

from __future__ import annotations

from dataclasses import dataclass

from .generation import Generation, GenerationOptions, generate
from .loading import family
from .maps import CrossAttentionMaps, SelfAttentionMaps, cross_maps, self_maps
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens


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
    tokens = [PromptTokens.from_tokenizer(pipe.tokenizer, p) for p in prompts]
    store = AttentionStore(record)
    gen = generate(pipe, prompts, store, options, progress=progress)
    h, w = gen.latents.shape[2:]
    settings = {
        "prompts": prompts,
        "model": str(model),
        "family": family(pipe),
        **options.to_dict(),
        "height": h * pipe.vae_scale_factor,
        "width": w * pipe.vae_scale_factor,
        "record": {k: v for k, v in vars(record).items()},
    }
    return AttendResult(gen, store, tokens, settings)


def attention_figures(result: AttendResult, maps: CrossAttentionMaps, prompt: int = 0, components: int = 6,
                      cell: int = 128) -> dict[str, object]:
    """The pictures of one prompt: image, per-token grid, overlays, argmax-token map, self-attention components."""
    from . import plot

    image = result.images[prompt]
    heat = maps.tokens(prompt)
    labels = [m.label for m in heat]
    figures = {
        "image": image,
        "cross_attention": plot.grid([m.image() for m in heat], labels, cell=cell,
                                     title=f"cross-attention per token: {maps.prompts[prompt].prompt}"),
        "overlays": plot.grid([m.overlay(image) for m in heat], labels, cell=cell, title="overlaid on the image"),
    }
    tokens = maps.prompts[prompt]
    names = {i: f"{i}: {tokens.tokens[i]}" for i in range(1, tokens.end)}
    figures["argmax"] = plot.argmax_image(maps.argmax(prompt).numpy(), names, size=256)
    try:
        selfmaps = result.self_maps()
    except Exception:  # no self-attention recorded (switched off)
        selfmaps = None
    if selfmaps is not None and components:
        comps = selfmaps.components(components, prompt)
        figures["self_attention"] = plot.grid(
            [plot.colorize(_unit(c).numpy()) for c in comps], [f"component {i + 1}" for i in range(len(comps))],
            cell=cell, title=f"self-attention components at {selfmaps.size[0]}x{selfmaps.size[1]}")
    return figures


def _unit(t):
    lo, hi = t.min(), t.max()
    return (t - lo) / (hi - lo) if hi > lo else t * 0


def write_outputs(result: AttendResult, out, res: int | tuple[int, ...] | None = None, components: int = 6) -> dict:
    """Write image(s), grids, maps (safetensors + JSON) and a self-contained index.html into out; return the files."""
    from pathlib import Path

    from .report import Section, page, staged, write_json

    maps = result.maps(res=res)
    files = {}
    sections = []
    with staged(out) as tmp:
        for p in range(len(result.prompts)):
            suffix = "" if len(result.prompts) == 1 else f"_{p}"
            figures = attention_figures(result, maps, p, components)
            for name, fig in figures.items():
                fig.save(tmp / f"{name}{suffix}.png")
                files[f"{name}{suffix}"] = f"{name}{suffix}.png"
            captions = {
                "image": "generated image",
                "cross_attention": "cross-attention of each token (normalised per map)",
                "overlays": "each token's map over the image",
                "argmax": "most-attended token per pixel (start token and padding ignored)",
                "self_attention": "top principal components of the self-attention (mean-centred rows, SVD)",
            }
            sections.append(Section(f"“{result.prompts[p].prompt}”",
                                    f"Maps at {maps.settings['selection']['map_size']} from "
                                    f"{maps.settings['selection']['layers']} layers, averaged over heads and steps.",
                                    [(captions[n], f) for n, f in figures.items()]))
        maps.save(tmp / "maps")
        files["maps"] = "maps.safetensors"
        files["maps_json"] = "maps.json"
        write_json(tmp / "settings.json", maps.settings)
        files["settings"] = "settings.json"
        (tmp / "index.html").write_text(page("prompt2prompt: attention maps", sections, maps.settings))
        files["html"] = "index.html"
    return {k: Path(out) / v for k, v in files.items()}
