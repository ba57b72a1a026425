"""FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models"): a real
image edited without inverting it, on flow-matching pipelines (SD3 / SD3.5, Flux.1).

No noise is searched for. The edited latent starts as the image's own latent and is moved by the difference of the
target's and the source's velocities, each evaluated on a noisy copy made with the same fresh noise:

    z_src(t) = (1 - t) x_src + t n,   n ~ N(0, I), drawn anew at each step (n_avg draws averaged)
    z_tar(t) = z_edit + z_src(t) - x_src
    z_edit  <- z_edit + (t_next - t) * mean[v(z_tar(t), t | target) - v(z_src(t), t | source)]

over the last n_max of the pipeline's `steps` noise levels (the first, noisiest ones are skipped: how far the edit
may move). With the target prompt equal to the source and equal guidance the difference is zero and the image comes
back exactly. Each velocity is the pipeline's own guided one (`flow.velocity`: SD3's classifier-free guidance, Flux's
guidance input), the source with its guidance and the target with its (usually higher) one. The defaults per family
(`families.Family.flowedit`) are those of the paper's published settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from tqdm import tqdm

from .errors import InputError, ModelError, PromptError
from .families import family_of


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

    def __post_init__(self):
        for name, low in (("steps", 1), ("n_max", 0), ("n_avg", 1), ("seed", 0), ("height", 1), ("width", 1),
                          ("max_sequence_length", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"{name.replace('_', ' ')} must be a whole number >= {low}, got {value!r}")
        for name in ("source_guidance", "target_guidance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise InputError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {value!r}")

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
        return FlowEditOptions(steps, n_max, self.n_avg, source if self.source_guidance is None else
                               self.source_guidance, target if self.target_guidance is None else self.target_guidance,
                               self.seed, self.height, self.width, self.max_sequence_length)


@dataclass
class FlowEditResult:
    image: Image.Image  # the edited image
    source: Image.Image  # the input as edited (cropped and resized to the model's size)
    latent: torch.Tensor  # (1, channels, h, w) the edited latent
    settings: dict = field(default_factory=dict)  # prompts, options (defaults filled in), family, seconds


def flowedit(pipe, image, source: str, target: str, options: FlowEditOptions = FlowEditOptions(),
             progress: bool = True) -> FlowEditResult:
    """Edit a real image (path or PIL) from its caption `source` to `target` with FlowEdit (module docstring)."""
    import time

    from .flow import set_flow_timesteps, velocity
    from .generation import image_size_for
    from .images import prepare_image
    from .inversion import decode, encode, pack, unpack
    from .routing import denoiser, exclusive

    options = options.resolved(pipe)
    for name, prompt in (("source", source), ("target", target)):
        if not (prompt or "").strip():
            raise PromptError(f"expected a {name} prompt with at least one word, got {prompt!r}")
    notes: list[str] = []
    prepared = prepare_image(image, image_size_for(pipe, options.height, options.width), notes=notes)
    start = time.perf_counter()
    with exclusive(pipe), torch.no_grad():
        x_src = encode(pipe, prepared)  # (1, channels, h, w)
        grid = tuple(x_src.shape[2:])
        x_src = pack(pipe, x_src).float()  # as the transformer takes it
        v_src = velocity(pipe, source, options.source_guidance, options.max_sequence_length, grid)
        v_tar = velocity(pipe, target, options.target_guidance, options.max_sequence_length, grid)
        schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        set_flow_timesteps(pipe, schedule, options.steps, x_src)
        sigmas, scale = schedule.sigmas.float(), schedule.config.num_train_timesteps  # (steps + 1,) down to 0
        dtype = denoiser(pipe).dtype
        generator = torch.Generator("cpu").manual_seed(options.seed)
        edited = x_src.clone()
        first = options.steps - options.n_max
        for i in tqdm(range(first, options.steps), desc="FlowEdit", disable=not progress, leave=False):
            t, t_next = sigmas[i], sigmas[i + 1]
            delta = torch.zeros_like(x_src)
            for _ in range(options.n_avg):
                noise = torch.randn(x_src.shape, generator=generator, dtype=torch.float32).to(x_src.device)
                z_src = (1 - t) * x_src + t * noise
                z_tar = edited + z_src - x_src
                delta += (v_tar(z_tar.to(dtype), t * scale).float() - v_src(z_src.to(dtype), t * scale).float())
            edited = edited + (t_next - t) * delta / options.n_avg
        latent = unpack(pipe, edited.to(dtype), prepared.size)
        picture = decode(pipe, latent)
    settings = {"method": "flowedit", "prompts": [source, target], **asdict(options), "family": family_of(pipe).name,
                "seconds": time.perf_counter() - start, "conversions": notes,
                "model_calls": options.n_max * options.n_avg * 2}
    return FlowEditResult(picture, prepared, latent.detach().cpu(), settings)

