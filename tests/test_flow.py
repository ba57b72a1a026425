"""Rectified-flow inversion (flow.py): the solvers' order on an ODE with a known solution, the scheduler inside a
real SD3 pipeline loop, round trips through the pipeline, files, and edits from a flow inversion."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import InputError
from prompt2prompt.flow import FireFlowScheduler, RFSolverScheduler, flow_sampler, invert_flow
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.inversion import (
    Inversion,
    InversionOptions,
    check_inversion,
    encode,
    invert,
    sampler,
    sampling_kwargs,
)
from prompt2prompt.testing import tiny_pipeline


def field(x, t):
    """dx/ds = cos(3 s) x + s, with s = t / 1000: smooth, non-linear in s, with curvature."""
    s = t / 1000
    return torch.cos(3 * s) * x + s


def sample(scheduler, x, steps):
    """The pipeline loop, as diffusers runs it: the model at each timestep, then scheduler.step."""
    scheduler.set_timesteps(steps)
    calls = 0
    for t in scheduler.timesteps:
        x = scheduler.step(field(x, t), t, x, return_dict=False)[0]
        calls += 1
    return x, calls


def reference(x, steps=4000):
    """The ODE's solution from s = 1 down to 0 by RK4 on a fine grid."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = x.double()
    for a, b in zip(s[:-1], s[1:]):
        h = b - a
        k1 = field(x, a * 1000)
        k2 = field(x + h / 2 * k1, (a + h / 2) * 1000)
        k3 = field(x + h / 2 * k2, (a + h / 2) * 1000)
        k4 = field(x + h * k3, b * 1000)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_fireflow_scheduler_is_second_order_and_euler_first(shift):
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    exact = reference(x)
    errors = {}
    for cls in (FireFlowScheduler, FlowMatchEulerDiscreteScheduler):
        for steps in (10, 40, 80):
            out, calls = sample(cls(shift=shift), x.clone(), steps)
            assert calls == steps + (cls is FireFlowScheduler)  # FireFlow: one call per step plus the first
            errors[cls.__name__, steps] = (out - exact).abs().max().item()
    # the observed order between 40 and 80 steps: log2 of the error ratio when the step is halved
    fire = math.log2(errors["FireFlowScheduler", 40] / errors["FireFlowScheduler", 80])
    euler = math.log2(errors["FlowMatchEulerDiscreteScheduler", 40] / errors["FlowMatchEulerDiscreteScheduler", 80])
    assert 1.7 < fire < 2.7 and 0.8 < euler < 1.3, (fire, euler)
    assert errors["FireFlowScheduler", 40] < errors["FlowMatchEulerDiscreteScheduler", 40] / 10


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rf_solver_scheduler_is_second_order_at_two_calls_a_step(shift):
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)
    exact = reference(x)
    errors = {}
    for steps in (20, 40):
        out, calls = sample(RFSolverScheduler(shift=shift), x.clone(), steps)
        assert calls == 2 * steps
        errors[steps] = (out - exact).abs().max().item()
    assert 1.7 < math.log2(errors[20] / errors[40]) < 2.7, errors
    euler, _ = sample(FlowMatchEulerDiscreteScheduler(shift=shift), x.clone(), 40)  # the same 40 calls
    assert errors[20] < (euler - exact).abs().max().item() / 5


def test_inversion_then_sampling_returns_to_the_start():
    pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    start = torch.linspace(-1, 1, 5, dtype=torch.float64)
    gaps = {}
    for method, steps in (("fireflow", 15), ("euler", 16)):  # the same number of model calls each way
        noise = invert_flow(pipe, start.clone(), field, steps, method, progress=False)
        back, _ = sample(flow_sampler(pipe, method), noise, steps)
        gaps[method] = (back - start).abs().max().item()
    assert gaps["fireflow"] < gaps["euler"] / 20
    noise = invert_flow(pipe, start.clone(), field, 8, "rf-solver", progress=False)  # 16 calls each way too
    back, calls = sample(flow_sampler(pipe, "rf-solver"), noise, 8)
    assert calls == 16 and (back - start).abs().max().item() < gaps["euler"] / 10
    noise = invert_flow(pipe, start.clone(), field, 30, "fireflow", progress=False)
    finer = (sample(flow_sampler(pipe, "fireflow"), noise, 30)[0] - start).abs().max().item()
    assert finer < gaps["fireflow"] / 3  # twice the steps, about a quarter of the gap


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pipe = tiny_pipeline("sd3", tmp_path_factory.mktemp("sd3"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _picture(size=32):
    rng = np.random.default_rng(0)
    a = np.zeros((size, size, 3), np.uint8) + 60
    a[6:20, 8:24] = (200, 40, 40)
    a[20:28, 4:12] = (40, 40, 200)
    a = np.clip(a + rng.integers(0, 10, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def test_pipeline_round_trip_fireflow_and_rf_solver_beat_euler_at_equal_calls(sd3):
    image, caption = _picture(), "a red square"
    target = encode(sd3, image)
    gaps = {}
    solvers = {"fireflow": FireFlowScheduler, "rf-solver": RFSolverScheduler, "euler": FlowMatchEulerDiscreteScheduler}
    for method, steps in (("fireflow", 9), ("rf-solver", 5), ("euler", 10)):  # 10 model calls each way
        inv = invert(sd3, image, caption, InversionOptions(method=method, steps=steps, guidance=1.0), progress=False)
        assert inv.uncond.numel() == 0 and inv.options.method == method
        with sampler(sd3, inv) as used:
            assert type(used) is solvers[method]
            out = generate(sd3, [caption], None, GenerationOptions(steps=steps, guidance=1.0), progress=False,
                           **sampling_kwargs(inv))
        assert type(sd3.scheduler) is FlowMatchEulerDiscreteScheduler  # the caller's scheduler is back
        gaps[method] = (out.latents.float() - target.float()).pow(2).mean().sqrt().item()
    assert gaps["fireflow"] < gaps["euler"] / 2 and gaps["rf-solver"] < gaps["euler"] / 2, gaps


def test_guided_inversion_round_trip(sd3):
    """With classifier-free guidance, inversion and sampling use one guided velocity: the round trip still closes."""
    image, caption = _picture(), "a red square"
    inv = invert(sd3, image, caption, InversionOptions(steps=12, guidance=3.0), progress=False)
    assert inv.options.method == "fireflow"  # auto on a flow model
    with sampler(sd3, inv):
        out = generate(sd3, [caption], None, GenerationOptions(steps=12, guidance=3.0), progress=False,
                       **sampling_kwargs(inv))
    target = encode(sd3, image)
    rms = (out.latents.float() - target.float()).pow(2).mean().sqrt().item()
    assert rms < 0.05 * target.float().std().item()


def test_flow_inversion_file_round_trip_and_checks(sd3, tmp_path):
    inv = invert(sd3, _picture(), "a red square", InversionOptions(steps=3, guidance=1.0), progress=False)
    path = inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(path)
    assert back.options == inv.options and torch.equal(back.latent, inv.latent) and back.uncond.numel() == 0
    check_inversion(sd3, back, "a red square")
    unet = tiny_pipeline("sd1", tmp_path / "sd1")
    with pytest.raises(InputError, match="flow-matching"):
        check_inversion(unet, back, "a red square")
    with pytest.raises(InputError, match="expected one of fireflow, euler"):
        invert(sd3, _picture(), "a red square", InversionOptions(method="null-text", steps=2), progress=False)
    with pytest.raises(InputError, match="expected one of null-text, ddim, negative-prompt"):
        invert(unet, _picture(), "a red square", InversionOptions(method="fireflow", steps=2), progress=False)


def test_edit_from_a_flow_inversion_keeps_the_source_row(sd3):
    caption = "a red square"
    inv = invert(sd3, _picture(), caption, InversionOptions(steps=6, guidance=1.0, max_sequence_length=24),
                 progress=False)
    with sampler(sd3, inv):
        alone = generate(sd3, [caption], None, GenerationOptions(steps=6, guidance=1.0, max_sequence_length=24),
                         progress=False, **sampling_kwargs(inv))
    result = edit(sd3, caption, "a blue square", EditOptions(), GenerationOptions(), vanilla=False, progress=False,
                  inversion=inv)
    assert result.settings["inversion"]["method"] == "fireflow"
    src = result.controlled.latents[0].float()
    # the source row is the inversion's own sampling (its batch neighbour differs; rounding only)
    assert torch.allclose(src, alone.latents[0].float(), atol=1e-4), (src - alone.latents[0]).abs().max()
    assert not torch.allclose(result.controlled.latents[1], result.controlled.latents[0], atol=1e-3)
    assert math.isfinite(result.controlled.latents.float().sum().item())


def test_cli_invert_and_edit_from_on_a_saved_sd3_folder(sd3, tmp_path):
    from prompt2prompt.cli import main

    folder = tmp_path / "sd3"
    sd3.save_pretrained(folder)
    _picture().save(tmp_path / "in.png")
    inv_path = tmp_path / "inv.safetensors"
    assert main(["invert", str(tmp_path / "in.png"), "a red square", "--model", str(folder), "--steps", "3",
                 "--guidance", "1", "--out", str(inv_path), "--quiet"]) == 0
    inv = Inversion.load(inv_path)
    assert inv.options.method == "fireflow"
    # the recorded PSNR is that of the reconstruction written beside the file against the prepared input
    rec = np.asarray(Image.open(tmp_path / "inv_reconstruction.png").convert("RGB"), dtype=np.float64) / 255
    mse = ((rec - np.asarray(inv.image.convert("RGB"), dtype=np.float64) / 255) ** 2).mean()
    assert inv.settings["psnr_vs_input"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-6)
    assert np.isfinite(inv.settings["psnr_vs_autoencoder"])
    assert main(["edit", "a red square", "a blue square", "--from", str(inv_path), "--model", str(folder),
                 "--blend", "square", "--out", str(tmp_path / "edit"), "--quiet"]) == 0
    assert (tmp_path / "edit" / "index.html").exists()
    settings = (tmp_path / "edit" / "settings.json").read_text()
    assert '"fireflow"' in settings
