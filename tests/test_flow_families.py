"""Real images on every flow family through its adapter's real-image side (`families/latents.py`), checked against the
pipeline's own loop: the velocity the inversion integrates is the model output the loop hands its scheduler, the grid
it walks is the loop's, the layouts round-trip exactly, the inversion closes, and an edit from it keeps its source row
and the input's pixels outside the blend. (The solvers' orders: test_flow; SD3 and Flux.1 in their own files too; the
README's `p2p invert`, `edit --from` and `edit --from-image` on every family: test_readme.)"""

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.families import FAMILIES
from prompt2prompt.flow import flow_sampler, set_flow_timesteps, velocity
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.inversion import InversionOptions, encode, invert, pack, sample_back, unpack
from prompt2prompt.testing import KINDS

CAPTION, SIZE = "a red square", dict(height=32, width=32)
FLOW = [f.name for f in FAMILIES.values() if f.latents is not None and f.name in KINDS]  # this diffusers builds
NEWER = [name for name in FLOW if name not in ("sd3", "flux")]  # the families without a file of their own


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    a = np.full((32, 32, 3), 90, np.uint8)
    a[6:20, 8:24] = (200, 40, 40)
    a[20:28, 4:12] = (40, 40, 200)
    return Image.fromarray(np.clip(a + rng.integers(0, 10, a.shape), 0, 255).astype(np.uint8))


def _loop(pipe, guidance: float, steps: int = 3):
    """(sigmas, [(model output, timestep, latents)]) the pipeline's own loop hands its scheduler."""
    seen, sigmas = [], []
    scheduler = flow_sampler(pipe, "euler")
    step = scheduler.step

    def spy(output, t, sample, *args, **kwargs):
        sigmas.append(scheduler.sigmas.clone())
        seen.append((output.clone(), t.clone(), sample.clone()))
        return step(output, t, sample, *args, **kwargs)

    scheduler.step = spy
    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        generate(pipe, [CAPTION], None, GenerationOptions(steps=steps, guidance=guidance, seed=3, **SIZE),
                 progress=False)
    finally:
        pipe.scheduler = original
    return sigmas[0], seen


@pytest.mark.parametrize("kind", FLOW)
def test_the_velocity_is_the_loops_own_and_the_grid_its_grid(joint_pipes, kind):
    pipe, guidance = joint_pipes[kind], 3.0  # guided: the family's unconditional call or rows and its combination
    sigmas, calls = _loop(pipe, guidance)
    shape = tuple(encode(pipe, _picture()).shape)  # the image layout of a 32x32 picture
    v = velocity(pipe, CAPTION, guidance, None, shape)
    for output, t, latents in calls:  # the loop's latents, in its own layout
        torch.testing.assert_close(v(latents, t).float(), output.float(), atol=1e-5, rtol=1e-4)
    mine = flow_sampler(pipe, "euler")
    set_flow_timesteps(pipe, mine, 3, shape)
    torch.testing.assert_close(mine.sigmas, sigmas)
    x = encode(pipe, _picture())
    assert torch.equal(unpack(pipe, pack(pipe, x), _picture().size), x)  # the loop layout and back, exactly


@pytest.mark.parametrize("kind", NEWER)
def test_the_inversion_closes_and_an_edit_from_it_keeps_its_source_row_and_the_background(joint_pipes, kind):
    pipe = joint_pipes[kind]
    side = FAMILIES[kind].tiny_side  # 8x8 image tokens
    inv = invert(pipe, _picture(), CAPTION, InversionOptions(steps=6, guidance=1.0, height=side, width=side),
                 progress=False)
    assert inv.options.method == "fireflow" and inv.settings["family"] == kind
    alone = sample_back(pipe, inv, progress=False)
    target = encode(pipe, inv.image)
    gap = (unpack(pipe, alone.latents, inv.image.size).float() - target.float()).pow(2).mean().sqrt().item()
    missed = (inv.latent.float() - target.float()).pow(2).mean().sqrt().item()  # where it started: the noise
    # sampled back, near the image's latent again (up to the solver's error at 6 steps: the random Z-Image's field is
    # the roughest, 0.36 of the way)
    assert gap < 0.5 * missed, (gap, missed)
    # threshold 0.9: the random model's attention is nearly flat, so the default 0.3 masks every pixel
    result = edit(pipe, CAPTION, "a blue square", EditOptions(blend=("square",), threshold=0.9), vanilla=False,
                  progress=False, inversion=inv)
    torch.testing.assert_close(result.controlled.latents[0].float(), alone.latents[0].float(), atol=1e-4, rtol=0)
    assert not torch.allclose(result.controlled.latents[1], result.controlled.latents[0], atol=1e-3)
    outside = result.kept[0, 0].numpy() == 0  # beyond the feathered blend mask: the input's own pixels
    edited, original = (np.asarray(im, dtype=np.int16) for im in (result.controlled.images[1], inv.image))
    assert 0 < outside.mean() < 1
    assert np.abs(edited - original)[outside].max() == 0 and np.abs(edited - original)[~outside].max() > 0
