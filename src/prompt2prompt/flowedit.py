"""FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models"): a real
image edited without inverting it, on every flow-matching family (SD3 / SD3.5, Flux.1, Flux.2 [klein] and [dev],
Qwen-Image, Z-Image).

No noise is searched for. The edited latent starts as the image's own latent and is moved by the difference of the
target's and the source's velocities, each evaluated on a noisy copy made with the same fresh noise:

    z_src(t) = (1 - t) x_src + t n,   n ~ N(0, I), drawn anew at each step (n_avg draws averaged)
    z_tar(t) = z_edit + z_src(t) - x_src
    z_edit  <- z_edit + (t_next - t) * mean[v(z_tar(t), t | target) - v(z_src(t), t | source)]

over the last n_max of the pipeline's `steps` noise levels (the first, noisiest ones are skipped: how far the edit
may move). With the target prompt equal to the source and equal guidance the difference is zero and the image comes
back exactly. Each velocity is the pipeline's own guided one (`flow.velocity`, the family's: SD3's classifier-free
guidance, Flux's guidance input, ...), the source with its guidance and the target with its (usually higher) one. The
defaults per family (`families.Family.flowedit`) are those of the paper's published settings (SD3's, untuned, on the
families the paper gave none).

With `blend` words (this project's addition: FlowEdit itself has no mask), the velocities run under attention control
that sums those words' cross-attention (the source's words in the source's calls, the target's in the target's), and
after every walked step from `blend_start` on the edited latent is set back to the image's own outside the local-blend
mask (`edits.LocalBlend`'s mask: the union of both prompts' thresholded maps): the rest of the picture stays as it was,
exactly in the latent.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from tqdm import tqdm

from .attention import control
from .edits import LocalBlend
from .errors import InputError, ModelError, NonFiniteError, PromptError
from .families import family_of
from .numbers import MAX_STEPS, check_finite, check_seed, check_whole
from .routing import AttentionController
from .tokens import batch_tokens


@dataclass(frozen=True)
class FlowEditOptions:
    steps: int | None = None  # noise levels of the pipeline's schedule; None: the family's default (SD3 50, Flux 28)
    n_max: int | None = None  # the last n_max levels are walked (the edit's strength); None: the family's (33, 24)
    n_avg: int = 1  # noise draws averaged per step
    source_guidance: float | None = None  # guidance of the source velocity; None: the family's (SD3 3.5, Flux 1.5)
    target_guidance: float | None = None  # guidance of the target velocity; None: the family's (SD3 13.5, Flux 5.5)
    seed: int = 0  # of the noise draws
    height: int | None = None  # pixels to edit at; None: the model's native size
    width: int | None = None
    max_sequence_length: int | None = None  # T5 tokens of the prompts; None: the pipeline's default
    blend: tuple[str, ...] = ()  # local blend: words whose attention marks the region that may change; () none
    subtract: tuple[str, ...] = ()  # local blend: words whose region must not change
    threshold: float = 0.3  # local blend: mask threshold on the normalised attention
    blend_start: float = 0.0  # local blend: fraction of the walked steps before blending starts

    def __post_init__(self):
        check_seed(self.seed)
        for name, low, high in (("steps", 1, MAX_STEPS), ("n_max", 0, MAX_STEPS), ("n_avg", 1, None),
                                ("height", 1, None), ("width", 1, None), ("max_sequence_length", 1, None)):
            if getattr(self, name) is not None:
                check_whole(getattr(self, name), name.replace("_", " "), low, high)
        for name in ("threshold", "blend_start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"{name.replace('_', ' ')} must be a number from 0 to 1, got {value!r}")
        for name in ("blend", "subtract"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(w, str) and w.strip() for w in value):
                raise InputError(f"{name} must be a sequence of words, got {value!r}")
        if self.subtract and not self.blend:
            raise InputError(f"subtract words {self.subtract} need blend words: they are taken out of its mask")
        for name in ("source_guidance", "target_guidance"):
            if getattr(self, name) is not None:
                check_finite(getattr(self, name), name.replace("_", " "), 0)

    def resolved(self, pipe) -> FlowEditOptions:
        """The options with the family's defaults filled in, checked against each other."""
        family = family_of(pipe)
        if family.flowedit is None:
            from .families import FAMILIES

            names = ", ".join(f.title for f in FAMILIES.values() if f.flowedit is not None)
            raise ModelError(f"FlowEdit runs on {names}; this is {family.title}")
        steps, n_max, source, target = family.flowedit
        steps = self.steps if self.steps is not None else steps
        n_max = self.n_max if self.n_max is not None else min(n_max, steps)
        if n_max > steps:
            raise InputError(f"n_max is how many of the {steps} steps are walked: expected at most {steps}, got "
                             f"{n_max}")
        return replace(self, steps=steps, n_max=n_max,
                       source_guidance=source if self.source_guidance is None else self.source_guidance,
                       target_guidance=target if self.target_guidance is None else self.target_guidance)


@dataclass
class FlowEditResult:
    image: Image.Image  # the edited image
    source: Image.Image  # the input as edited (cropped and resized to the model's size)
    latent: torch.Tensor  # (1, channels, h, w) the edited latent
    mask: torch.Tensor | None = None  # (1, 1, h, w) bool at the latent's size: the local-blend mask of the last
    # blended step (True: may change); None without blend words or before the first blended step
    settings: dict = field(default_factory=dict)  # prompts, options (defaults filled in), family, seconds

    def _repr_png_(self) -> bytes:
        from .display import pair_picture, png

        source, target = self.settings.get("prompts", ["input", "edit"])
        return png(pair_picture([self.source, self.image], [source, target], "FlowEdit"))

    def __repr__(self) -> str:
        return (f"FlowEditResult({self.settings.get('prompts')!r}, {self.image.width}x{self.image.height}, "
                f"{self.settings.get('model_calls')} model calls{', local blend' if self.mask is not None else ''})")


def flowedit(pipe, image, source: str, target: str, options: FlowEditOptions = FlowEditOptions(),
             progress: bool = True) -> FlowEditResult:
    """Edit a real image (path or PIL) from its caption `source` to `target` with FlowEdit (module docstring)."""
    import time

    from .flow import set_flow_timesteps, velocity
    from .generation import image_size_for
    from .images import prepare_image
    from .inversion.codec import decode, encode, pack, unpack
    from .routing import denoiser, exclusive

    options = options.resolved(pipe)
    for name, prompt in (("source", source), ("target", target)):
        if not (prompt or "").strip():
            raise PromptError(f"expected a {name} prompt with at least one word, got {prompt!r}")
    feed = _blend_feed(pipe, source, target, options)  # None without blend words; their words checked here
    notes: list[str] = []
    prepared = prepare_image(image, image_size_for(pipe, options.height, options.width), notes=notes,
                             purpose="editing")
    start = time.perf_counter()
    with exclusive(pipe), torch.no_grad():
        x_src = encode(pipe, prepared)  # (1, channels, h, w)
        shape = tuple(x_src.shape)
        x_src = pack(pipe, x_src).float()  # as the pipeline's loop holds it
        v_src = velocity(pipe, source, options.source_guidance, options.max_sequence_length, shape)
        v_tar = velocity(pipe, target, options.target_guidance, options.max_sequence_length, shape)
        schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        set_flow_timesteps(pipe, schedule, options.steps, shape)
        sigmas, scale = schedule.sigmas.float(), schedule.config.num_train_timesteps  # (steps + 1,) down to 0
        dtype = denoiser(pipe).dtype
        generator = torch.Generator("cpu").manual_seed(options.seed)
        edited = x_src.clone()
        first = options.steps - options.n_max
        with control(pipe, feed, prompts=1) if feed is not None else nullcontext():
            for k, i in enumerate(tqdm(range(first, options.steps), desc="FlowEdit", disable=not progress,
                                       leave=False)):
                t, t_next = sigmas[i], sigmas[i + 1]
                delta = torch.zeros_like(x_src)
                for _ in range(options.n_avg):
                    noise = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(x_src.device)
                    z_src = (1 - t) * x_src + t * noise
                    z_tar = edited + z_src - x_src
                    with _row(feed, 1):
                        target_velocity = v_tar(z_tar.to(dtype), t * scale).float()
                    with _row(feed, 0):
                        delta += target_velocity - v_src(z_src.to(dtype), t * scale).float()
                edited = edited + (t_next - t) * delta / options.n_avg
                if feed is not None:  # outside the mask, back to the image's own latent
                    kept = feed.blend.step_end(k, t, torch.cat([x_src, edited]))
                    edited = edited if kept is None else kept[1:]
        if not bool(torch.isfinite(edited).all()):  # read once, after the walk
            raise NonFiniteError(f"FlowEdit's latent became NaN or infinite (source guidance "
                                 f"{options.source_guidance:g}, target guidance {options.target_guidance:g}): a "
                                 "setting overflowed the model's numbers; lower it")
        latent = unpack(pipe, edited.to(dtype), prepared.size)
        picture = decode(pipe, latent)
    from .loading import model_name

    settings = {"method": "flowedit", "prompts": [source, target], **asdict(options), "family": family_of(pipe).name,
                "model": model_name(pipe),
                "seconds": time.perf_counter() - start, "conversions": notes,
                "model_calls": options.n_max * options.n_avg * 2}
    mask = None if feed is None or feed.blend.mask is None else feed.blend.mask[1:].cpu()  # (1, 1, grid)
    if mask is not None and mask.shape[-2:] != latent.shape[-2:]:  # packed tokens: each a patch of the latent
        mask = F.interpolate(mask.float(), size=tuple(latent.shape[-2:])) > 0.5
    return FlowEditResult(picture, prepared, latent.detach().cpu(), mask=mask, settings=settings)


class _BlendFeed(AttentionController):
    """Sums the blend words' cross-attention into a `LocalBlend` from FlowEdit's separate velocity calls: `row` says
    whose call runs (0: the source's, 1: the target's); the call's conditional row adds to that row of the sums."""

    def __init__(self, blend: LocalBlend, steps: int):
        self.blend, self.steps, self.row, self.begun = blend, steps, 0, False

    def begin(self, run) -> None:
        if not self.begun:  # the first call of either prompt: the blend's shapes, its start in walked steps
            self.begun = True
            self.blend.begin(run)
            self.blend.start = int(self.blend.start_fraction * self.steps)

    def wants(self, site) -> bool:
        return self.blend.wants(site)

    def attention(self, probs, site):
        self.blend.attention_of(self.row, probs, site)  # probs: (1, heads, pixels, tokens), the running prompt's row
        return None


def _blend_feed(pipe, source: str, target: str, options: FlowEditOptions) -> _BlendFeed | None:
    if not options.blend:
        return None
    tokens = batch_tokens(pipe, [source, target], options.max_sequence_length)
    blend = LocalBlend(tokens, tuple(options.blend), tuple(options.subtract), options.threshold, options.blend_start,
                       steps=options.n_max)
    return _BlendFeed(blend, options.n_max)


@contextmanager
def _row(feed: _BlendFeed | None, row: int):
    """The velocity call inside is the source's (0) or the target's (1)."""
    if feed is not None:
        feed.row = row
    yield

