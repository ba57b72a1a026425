"""Sampling back from an inversion as it was made: its sampler (DDIM, or the flow method's solver), latent, per-step
unconditional embeddings, steps, guidance and text length.

Sampling from an inversion needs the same DDIM schedule and guidance; `generate(..., uncond=inversion.uncond)` swaps
the per-step unconditional embeddings in through the pipeline's step callback.
"""

from __future__ import annotations

from dataclasses import replace

from ..flow import FLOW_METHODS
from .codec import _codec
from .ddim import ddim_scheduler
from .record import Inversion


def sampler(pipe, inversion: Inversion):
    """A context manager in which the pipeline samples as the inversion needs: DDIM, or the flow method's solver."""
    if inversion.options.method in FLOW_METHODS:
        from ..flow import flow_scheduler

        return flow_scheduler(pipe, inversion.options.method)
    return ddim_scheduler(pipe)


def sampling_kwargs(inversion: Inversion, pipe=None) -> dict:
    """What `generate` needs to sample from the inversion: its latent (in the layout the pipeline's `latents=` takes:
    give the pipe), per-step unconditional embeddings (DDIM methods; flow inversions use the plain empty caption, as
    their inversion did) and, for `direct`, the latent path the source prompt is pinned to."""
    uncond = None if inversion.options.method in FLOW_METHODS else inversion.uncond
    latent = inversion.latent if pipe is None else _codec(pipe).input(pipe, inversion.latent)
    return {"latent": latent, "uncond": uncond, "uncond_pooled": inversion.uncond_pooled,
            "path": inversion.path}


def sampling_options(inversion: Inversion, generation=None):
    """The generation options of sampling from the inversion: its steps, guidance and text length over `generation`'s
    (size, seed and the rest; the seed does not matter, the latent is the inversion's)."""
    from ..generation import GenerationOptions

    return replace(generation or GenerationOptions(), steps=inversion.options.steps,
                   guidance=inversion.options.guidance, max_sequence_length=inversion.options.max_sequence_length,
                   height=inversion.image.height, width=inversion.image.width)


def sample_back(pipe, inversion: Inversion, prompts: list[str] | str | None = None, controller=None,
                generation=None, progress: bool = True, **pipe_kwargs):
    """Sample from an inversion as it was made (its sampler, latent, per-step unconditional embeddings, steps,
    guidance and text length): its caption alone (default) gives the reconstruction; with the edited prompts and a
    controller, an edit. Returns the `generation.Generation`."""
    from ..generation import generate

    prompts = [inversion.prompt] if prompts is None else prompts
    with sampler(pipe, inversion):
        return generate(pipe, prompts, controller, sampling_options(inversion, generation), progress=progress,
                        **sampling_kwargs(inversion, pipe), **pipe_kwargs)
