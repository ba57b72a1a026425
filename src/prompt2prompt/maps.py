"""Attention maps as small result objects: per-token cross-attention, most-attended token, self-attention components.

Computing lives here; drawing lives in `plot.py`.

    maps = cross_maps(store, prompts, res=16)        # (prompts, h, w, tokens), averaged over layers and heads
    maps.word("squirrel").overlay(image)             # PIL image
    maps.argmax()                                    # (h, w) token positions
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError, P2PError, PromptError
from .store import AttentionStore
from .tokens import PromptTokens


@dataclass(frozen=True)
class HeatMap:
    """One (h, w) attention map and what it shows."""

    values: torch.Tensor  # (h, w) float32
    label: str

    def normalized(self) -> torch.Tensor:
        """Scaled to [0, 1] by its own min and max."""
        v = self.values
        lo, hi = v.min(), v.max()
        return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)

    def resized(self, size: tuple[int, int]) -> torch.Tensor:
        """(height, width) bilinear upsampling of the normalised map."""
        return F.interpolate(self.normalized()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]

    def mask(self, threshold: float = 0.5, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Boolean mask of the normalised map above threshold (optionally at another size)."""
        return (self.resized(size) if size else self.normalized()) > threshold

    def image(self, size: int | None = None) -> Image.Image:
        from .plot import colorize

        values = self.resized((size, size)) if size else self.normalized()
        return colorize(values.numpy())

    def overlay(self, image: Image.Image, alpha: float = 0.55) -> Image.Image:
        from .plot import overlay

        return overlay(image, self.resized((image.height, image.width)).numpy(), alpha)

    def _repr_png_(self) -> bytes:
        from .display import heat_map_picture, png

        return png(heat_map_picture(self))

    def __repr__(self) -> str:
        h, w = self.values.shape
        return f"HeatMap({self.label!r}, {h}x{w}, max {float(self.values.max()):.3g})"


@dataclass
class CrossAttentionMaps:
    """Cross-attention per token, aggregated over the chosen layers, heads and steps."""

    values: torch.Tensor  # (prompts, h, w, tokens) float32, on the CPU
    prompts: list[PromptTokens]
    settings: dict = field(default_factory=dict)  # what made them: model, seed, steps, guidance, selection

    def _tokens(self, prompt: int) -> PromptTokens:
        if not 0 <= prompt < len(self.prompts):
            raise P2PError(f"prompt index {prompt} is outside 0..{len(self.prompts) - 1}")
        return self.prompts[prompt]

    def word(self, word: str | int, prompt: int = 0, occurrence: int | None = None, part: str | None = "default"
             ) -> HeatMap:
        """The map of a word (its tokens summed; every occurrence unless one is chosen) or of a token index.

        part: in a joint text sequence (SD3: CLIP then T5) the encoder part to read the word in; "default": the
        model's default part (settings["text_part"]), None: every part.
        """
        tokens = self._tokens(prompt)
        part = self.settings.get("text_part") if part == "default" else part
        if isinstance(word, int) and not isinstance(word, bool) and word not in tokens.real_positions(start=True):
            tokens.check_index(word)  # outside the sequence: that error; inside but padding: this one
            raise PromptError(f"token index {word} is padding, not a token of the prompt {tokens.prompt!r} (its tokens "
                              f"are at {', '.join(map(str, tokens.real_positions(start=True)))}); token({word}) reads "
                              "a padding position")
        positions = list(tokens.positions(word, occurrence, part if tokens.parts else None))
        label = word if isinstance(word, str) else tokens.label(word)
        return HeatMap(self.values[prompt, :, :, positions].sum(-1), str(label))

    def token(self, index: int, prompt: int = 0) -> HeatMap:
        """The map of one token position (0 is the start token; positions after the end token are padding)."""
        label = self._tokens(prompt).label(index)
        return HeatMap(self.values[prompt, :, :, index], label)

    def _part(self, prompt: int) -> tuple[int, PromptTokens]:
        """(offset, tokens) of the part of a prompt's text the maps show: the default part of a joint sequence."""
        tokens = self._tokens(prompt)
        return tokens.part_of(self.settings.get("text_part") if tokens.parts else None)

    def tokens(self, prompt: int = 0, start: bool = False) -> list[HeatMap]:
        """One map per real token of the prompt (without the start token unless asked), end token included; in a
        joint sequence, those of the default part."""
        offset, part = self._part(prompt)
        return [self.token(offset + i, prompt) for i in part.real_positions(start)]

    def argmax(self, prompt: int = 0, ignore_start: bool = True, ignore_padding: bool = True) -> torch.Tensor:
        """(h, w) position of the most attended token per pixel. By default among the tokens of the prompt's words
        (start token, end token and padding left out); in a joint sequence, those of the default part."""
        values = self.values[prompt].clone()  # (h, w, tokens)
        offset, part = self._part(prompt)
        if ignore_padding:
            keep = torch.zeros(values.shape[-1], dtype=torch.bool)
            keep[[offset + i for i in part.word_positions()]] = True
            if not ignore_start:
                keep[[offset + i for i in part.real_positions(start=True) if part.tokens[i] == "<start>"]] = True
            values[..., ~keep] = -1
        elif ignore_start:
            values[..., [offset + i for i in part.real_positions(start=True) if part.tokens[i] == "<start>"]] = -1
        return values.argmax(-1)

    def word_index(self, prompt: int = 0) -> torch.Tensor:
        """(h, w) index of each pixel's most-attended word in the prompt's word list (`PromptTokens.words`)."""
        tokens = self._tokens(prompt)
        owner = torch.full((tokens.length,), -1, dtype=torch.long)
        for k, word in enumerate(tokens.words):
            owner[list(word.tokens)] = k
        return owner[self.argmax(prompt)]

    def _repr_png_(self) -> bytes:
        from .display import maps_picture, png

        return png(maps_picture(self))

    def __repr__(self) -> str:
        from .display import maps_summary

        return maps_summary(self)

    # -- files ---------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` (the tensor) and `<path>.json` (tokens and settings)."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix("")
        prompts = [p.to_dict() for p in self.prompts]
        meta = {"kind": "cross_attention_maps", "prompts": prompts, "settings": self.settings}
        text = json.dumps(meta, indent=2)
        save_file({"values": self.values.contiguous()}, str(path) + ".safetensors", metadata={"p2p": text})
        Path(str(path) + ".json").write_text(text)
        return Path(str(path) + ".safetensors")

    @classmethod
    def load(cls, path: str | Path) -> CrossAttentionMaps:
        from safetensors import safe_open

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        if not path.exists():
            raise InputError(f"no maps file at {path}: expected the .safetensors file `p2p attend` writes")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "p2p" not in meta:
                raise InputError(f"{path} holds no prompt2prompt maps (no 'p2p' metadata)")
            values = f.get_tensor("values")
        meta = json.loads(meta["p2p"])
        return cls(values, [PromptTokens.from_dict(p) for p in meta["prompts"]], meta["settings"])


def cross_maps(
    store: AttentionStore,
    prompts: list[PromptTokens],
    res: int | tuple[int, ...] | None = None,
    places: tuple[str, ...] | None = None,
    heads: tuple[int, ...] | None = None,
    settings: dict | None = None,
) -> CrossAttentionMaps:
    """Average the recorded cross-attention over the layers at the given map sides and places and over heads.

    Maps of several resolutions are upsampled (bilinear) to the largest before averaging.
    """
    names = store.select(True, res, places)
    if not names:
        raise P2PError(
            f"no cross-attention was recorded at res={res} places={places}; recorded sides: {store.resolutions(True)}"
        )
    target = max((store.res[n] for n in names), key=lambda r: r[0] * r[1])
    total = None
    for name in names:
        mean = store.mean(name)  # (prompts, heads, pixels, tokens)
        if heads is not None:
            keep = [h for h in heads if h < mean.shape[1]]
            if not keep:
                raise P2PError(f"heads {heads} do not exist in {name}, which has {mean.shape[1]}")
            mean = mean[:, keep]
        h, w = store.res[name]
        m = mean.mean(1).reshape(mean.shape[0], h, w, -1).permute(0, 3, 1, 2)  # (prompts, tokens, h, w)
        if (h, w) != target:
            m = F.interpolate(m, size=target, mode="bilinear", align_corners=False)
        total = m if total is None else total + m
    values = (total / len(names)).permute(0, 2, 3, 1).contiguous().cpu()  # (prompts, h, w, tokens)
    chosen = {"res": res, "places": places, "heads": heads, "layers": len(names), "map_size": list(target)}
    return CrossAttentionMaps(values, list(prompts), {**(settings or {}), "selection": chosen})


@dataclass
class SelfAttentionMaps:
    values: torch.Tensor  # (prompts, pixels, pixels) float32: step-, layer- and head-averaged self-attention
    size: tuple[int, int]  # (h, w) of the maps

    def components(self, k: int = 6, prompt: int = 0) -> torch.Tensor:
        """(k, h, w): the top-k right singular vectors of the mean-centred rows, as images (as the p2p notebook)."""
        rows = self.values[prompt].double()
        centred = rows - rows.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return vh[:k].float().reshape(-1, *self.size)


def self_maps(store: AttentionStore, res: int | None = None, places: tuple[str, ...] | None = None
              ) -> SelfAttentionMaps:
    """Average the recorded self-attention at one map side (default: the largest recorded)."""
    sides = store.resolutions(cross=False)
    if not sides:
        raise P2PError("no self-attention was recorded")
    side = res or max(sides)
    names = store.select(False, side, places)
    if not names:
        raise P2PError(f"no self-attention was recorded at side {side}; recorded sides: {sides}")
    values = sum(store.mean(n) for n in names) / len(names)
    return SelfAttentionMaps(values.cpu(), store.res[names[0]])

