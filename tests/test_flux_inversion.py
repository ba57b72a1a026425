"""Flux.1 real images: inversion in the packed latents the transformer sees, sampled back through the pipeline's own
loop (FireFlow closing better than Euler at equal model calls), its guidance input, edits from it, the CLI on a saved
tiny Flux folder, and inversion files of another family refused in one sentence."""

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import InputError
from prompt2prompt.inversion import Inversion, InversionOptions, check_inversion, encode, invert, sample_back, unpack
from prompt2prompt.testing import tiny_pipeline

CAPTION, SIZE = "a red square", dict(height=32, width=32)


@pytest.fixture(scope="module")
def flux(joint_pipes):
    return joint_pipes["flux"]


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    a = np.full((32, 32, 3), 90, np.uint8)
    a[6:20, 8:24] = (200, 40, 40)
    a[20:28, 4:12] = (40, 40, 200)
    return Image.fromarray(np.clip(a + rng.integers(0, 10, a.shape), 0, 255).astype(np.uint8))


def _gap(pipe, inv, target) -> float:
    out = sample_back(pipe, inv, progress=False)
    assert out.latents.shape == (1, 64, 16)  # the pipeline's packed latents: (1, tokens, 4 * channels)
    return (unpack(pipe, out.latents, inv.image.size).float() - target.float()).pow(2).mean().sqrt().item()


def test_flux_round_trip_fireflow_and_rf_solver_beat_euler_at_equal_calls(flux):
    image = _picture()
    target = encode(flux, image)  # (1, channels, h, w)
    gaps = {}
    for method, steps in (("fireflow", 9), ("rf-solver", 5), ("euler", 10)):  # 10 model calls each way
        inv = invert(flux, image, CAPTION, InversionOptions(method=method, steps=steps, guidance=1.0, **SIZE),
                     progress=False)
        assert inv.latent.shape == target.shape and inv.settings["family"] == "flux"
        gaps[method] = _gap(flux, inv, target)
    assert gaps["fireflow"] < gaps["euler"] / 2 and gaps["rf-solver"] < gaps["euler"] / 2, gaps
    assert gaps["fireflow"] < 0.2 * target.float().std().item(), gaps


def test_flux_dev_guidance_is_the_transformers_input_both_ways(flux):
    """A guidance-distilled Flux (dev): inverted and sampled back with the same guidance input, the round trip closes;
    another guidance value gives another noise (the input is used)."""
    import inspect

    from diffusers import FluxPipeline, FluxTransformer2DModel

    takes = inspect.signature(FluxTransformer2DModel.__init__).parameters
    config = {k: v for k, v in flux.transformer.config.items() if k in takes}
    torch.manual_seed(0)
    dev_net = FluxTransformer2DModel(**{**config, "guidance_embeds": True}).eval()
    assert dev_net.config.guidance_embeds
    dev = FluxPipeline(**{**flux.components, "transformer": dev_net})
    dev.set_progress_bar_config(disable=True)
    image = _picture()
    target = encode(dev, image)
    inv = invert(dev, image, CAPTION, InversionOptions(steps=9, guidance=3.5, **SIZE), progress=False)
    assert inv.options.method == "fireflow"
    assert _gap(dev, inv, target) < 0.2 * target.float().std().item()
    other = invert(dev, image, CAPTION, InversionOptions(steps=9, guidance=1.0, **SIZE), progress=False)
    assert not torch.allclose(inv.latent, other.latent, atol=1e-4)


def test_edit_from_a_flux_inversion_keeps_the_source_row_and_the_background(flux):
    inv = invert(flux, _picture(), CAPTION, InversionOptions(steps=6, guidance=1.0, **SIZE), progress=False)
    alone = sample_back(flux, inv, progress=False)
    # threshold 0.9: the random model's attention is nearly flat, so the default 0.3 masks every pixel
    result = edit(flux, CAPTION, "a blue square", EditOptions(blend=("square",), threshold=0.9), vanilla=False,
                  progress=False, inversion=inv)
    # the source row is the inversion's own sampling (its batch neighbour differs; rounding only)
    torch.testing.assert_close(result.controlled.latents[0].float(), alone.latents[0].float(), atol=1e-4, rtol=0)
    assert not torch.allclose(result.controlled.latents[1], result.controlled.latents[0], atol=1e-3)
    outside = result.kept[0, 0].numpy() == 0  # beyond the feathered blend mask: the input's own pixels
    assert 0 < outside.mean() < 1
    edited, original = (np.asarray(im, dtype=np.int16) for im in (result.controlled.images[1], inv.image))
    assert np.abs(edited - original)[outside].max() == 0 and np.abs(edited - original)[~outside].max() > 0


def test_cli_invert_and_edit_from_on_a_saved_flux_folder(flux, tmp_path, capsys):
    from prompt2prompt.cli import main

    folder = tmp_path / "flux"
    flux.save_pretrained(folder)
    _picture().save(tmp_path / "in.png")
    inv_path = tmp_path / "inv.safetensors"
    assert main(["invert", str(tmp_path / "in.png"), CAPTION, "--model", str(folder), "--steps", "3", "--guidance",
                 "1", "--height", "32", "--width", "32", "--out", str(inv_path), "--quiet"]) == 0
    inv = Inversion.load(inv_path)
    assert inv.options.method == "fireflow" and inv.settings["family"] == "flux"
    assert (tmp_path / "inv_reconstruction.png").exists()
    assert main(["edit", CAPTION, "a blue square", "--from", str(inv_path), "--model", str(folder), "--blend",
                 "square", "--out", str(tmp_path / "edit"), "--quiet"]) == 0
    assert '"fireflow"' in (tmp_path / "edit" / "settings.json").read_text()


def test_an_inversion_of_another_family_is_refused_in_one_sentence(flux, tmp_path):
    sd3 = tiny_pipeline("sd3", tmp_path / "sd3")
    inv = invert(sd3, _picture(), CAPTION, InversionOptions(steps=2, guidance=1.0), progress=False)
    back = Inversion.load(inv.save(tmp_path / "sd3.safetensors"))
    with pytest.raises(InputError, match=r"made with a Stable Diffusion 3 / 3\.5 pipeline.*this pipeline is Flux\.1"):
        check_inversion(flux, back, CAPTION)
    with pytest.raises(InputError, match="made with a Stable Diffusion 3"):
        edit(flux, CAPTION, "a blue square", inversion=back, progress=False)


def test_the_inversion_walks_the_grid_the_pipelines_own_loop_walks(flux):
    """With a dynamically shifting scheduler (as Flux.1-dev's), `set_flow_timesteps` gives the noise levels the
    pipeline's own call uses for that image size, and the round trip closes on them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from prompt2prompt.flow import set_flow_timesteps

    shifting = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(**{**flux.components, "scheduler": shifting})
    pipe.set_progress_bar_config(disable=True)
    used = {}

    def spy(p, step, t, kwargs):
        used.setdefault("sigmas", p.scheduler.sigmas.clone())
        return {}

    pipe(CAPTION, num_inference_steps=5, callback_on_step_end=spy, output_type="latent", **SIZE)
    image = _picture()
    mine = FlowMatchEulerDiscreteScheduler.from_config(shifting.config)
    set_flow_timesteps(pipe, mine, 5, tuple(encode(pipe, image).shape))
    torch.testing.assert_close(mine.sigmas, used["sigmas"])
    plain = FlowMatchEulerDiscreteScheduler.from_config(shifting.config)
    plain.set_timesteps(5, mu=0.0)
    assert not torch.allclose(plain.sigmas, used["sigmas"])  # the shift for 64 tokens is not nothing
    target = encode(pipe, image)
    # the shifted grid's larger steps near the image cost the random model more: 20 steps (0.35 std at 9, 0.05 at 20)
    inv = invert(pipe, image, CAPTION, InversionOptions(steps=20, guidance=1.0, **SIZE), progress=False)
    assert _gap(pipe, inv, target) < 0.1 * target.float().std().item()
