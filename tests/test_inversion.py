import random

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.attention import AttentionController
from prompt2prompt.cli import main
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import InputError, PromptError
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.images import prepare_image
from prompt2prompt.inversion import Inversion, InversionOptions, encode, invert, psnr
from prompt2prompt.shapes import world

STEPS = 5


@pytest.fixture(scope="module")
def scene_image():
    scene = world.scene_from_caption("a red circle and a blue square", random.Random(2))
    return scene.caption, scene.image()


@pytest.fixture(scope="module")
def null_text(sd1, scene_image):
    caption, image = scene_image
    return invert(sd1, image, caption, InversionOptions(steps=STEPS), progress=False)


def test_prepare_any_size_and_mode(tmp_path):
    rgba = Image.new("RGBA", (90, 50), (255, 0, 0, 0))
    out = prepare_image(rgba, (32, 32))
    assert out.size == (32, 32) and out.mode == "RGB"
    assert np.asarray(out)[16, 16].tolist() == [255, 255, 255]  # transparent composited on white
    grey = Image.new("L", (40, 80), 100)
    assert prepare_image(grey, (32, 48)).size == (48, 32)
    pal = Image.new("P", (20, 20))
    assert prepare_image(pal, (32, 32)).mode == "RGB"
    half = Image.new("RGB", (64, 32), "black")
    half.paste((255, 255, 255), (32, 0, 64, 32))
    right = prepare_image(half, (32, 32), offsets=(32, 0, 0, 0))  # cut the black left half away
    assert np.asarray(right).min() == 255
    with pytest.raises(InputError, match="leave nothing"):
        prepare_image(half, (32, 32), offsets=(40, 30, 0, 0))


def test_unreadable_and_missing_images(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        prepare_image(bad, (32, 32))
    with pytest.raises(InputError, match="no image file"):
        prepare_image(tmp_path / "missing.png", (32, 32))


def test_file_round_trip(null_text, tmp_path):
    path = null_text.save(tmp_path / "inv")
    assert path.suffix == ".safetensors"
    back = Inversion.load(path)
    assert back.prompt == null_text.prompt and back.options == null_text.options
    torch.testing.assert_close(back.latent, null_text.latent, atol=0, rtol=0)
    torch.testing.assert_close(back.uncond, null_text.uncond, atol=0, rtol=0)
    assert np.array_equal(np.asarray(back.image), np.asarray(null_text.image))
    assert back.settings["losses"] == [list(x) for x in null_text.settings["losses"]]
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(InputError):
        Inversion.load(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="no inversion file"):
        Inversion.load(tmp_path / "none.safetensors")


def test_null_text_optimisation_lowers_each_steps_loss(null_text):
    losses = null_text.settings["losses"]
    assert len(losses) == STEPS and null_text.uncond.shape[0] == STEPS
    before = sum(b for b, _ in losses)
    after = sum(a for _, a in losses)
    assert after < before


def test_sampling_from_null_text_retraces_the_optimised_path(sd1, null_text, scene_image):
    """Sampling with the saved per-step embeddings lands where the optimisation ended: its error against the image's
    latent is the last step's loss (each step's embedding is kept as it was, not aliased to a later one), and it is
    closer than plain DDIM."""
    caption, _ = scene_image
    target = encode(sd1, null_text.image)
    opts = GenerationOptions(steps=STEPS)
    rec = generate(sd1, caption, None, opts, latent=null_text.latent, uncond=null_text.uncond, progress=False)
    error = torch.nn.functional.mse_loss(rec.latents.float(), target).item()
    assert error == pytest.approx(null_text.settings["losses"][-1][1], rel=1e-5, abs=1e-9)
    assert not torch.equal(null_text.uncond[0], null_text.uncond[-1])
    ddim = invert(sd1, null_text.image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    plain = generate(sd1, caption, None, opts, latent=ddim.latent, uncond=ddim.uncond, progress=False)
    assert error < torch.nn.functional.mse_loss(plain.latents.float(), target).item()


def test_ddim_uncond_path_equals_plain_sampling(sd1, scene_image):
    """Swapping in per-step embeddings through the callback is exact: with the null embedding at every step,
    sampling from the inverted latent equals the pipeline's own sampling from it."""
    caption, image = scene_image
    inv = invert(sd1, image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    opts = GenerationOptions(steps=STEPS)
    swapped = generate(sd1, caption, None, opts, latent=inv.latent, uncond=inv.uncond, progress=False)
    plain = generate(sd1, caption, None, opts, latent=inv.latent, progress=False)
    torch.testing.assert_close(swapped.latents, plain.latents, atol=1e-5, rtol=1e-5)


def test_negative_prompt_method_uses_the_caption(sd1, scene_image):
    caption, image = scene_image
    inv = invert(sd1, image, caption, InversionOptions(method="negative-prompt", steps=STEPS), progress=False)
    ids = sd1.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = sd1.text_encoder(ids)[0][0]
    for k in range(STEPS):
        torch.testing.assert_close(inv.uncond[k], cond)


def test_edit_from_an_inversion(sd1, null_text, scene_image):
    caption, _ = scene_image
    rec = generate(sd1, caption, None, GenerationOptions(steps=STEPS), latent=null_text.latent,
                   uncond=null_text.uncond, progress=False)
    r = edit(sd1, caption, caption.replace("square", "cross"), EditOptions(blend=("square", "cross")),
             GenerationOptions(steps=99, seed=123), inversion=null_text, progress=False)
    assert r.settings["steps"] == STEPS and r.settings["inversion"]["method"] == "null-text"
    torch.testing.assert_close(r.controlled.latents[0], rec.latents[0], atol=1e-4, rtol=1e-4)
    assert psnr(r.controlled.images[0], rec.images[0]) > 40
    with pytest.raises(PromptError, match="made with the caption"):
        edit(sd1, "a green cross", "a green square", inversion=null_text, progress=False)


def test_direct_inversion_reconstructs_exactly_and_edits_run_free(sd1, scene_image, tmp_path):
    """Direct inversion: sampling puts the source exactly on the DDIM inversion's path (ending at the image's own
    latent), every step; an edited prompt is not pinned; the path survives the file; the path is checked."""
    caption, image = scene_image
    inv = invert(sd1, image, caption, InversionOptions(method="direct", steps=STEPS), progress=False)
    ddim = invert(sd1, image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    assert torch.equal(inv.latent, ddim.latent) and torch.equal(inv.uncond, ddim.uncond)
    assert inv.path.shape == (STEPS, *inv.latent.shape[1:])
    target = encode(sd1, inv.image)
    torch.testing.assert_close(inv.path[-1:], target, atol=0, rtol=0)  # the last step lands on the image's latent
    opts = GenerationOptions(steps=STEPS)
    from prompt2prompt.inversion import sampling_kwargs

    rec = generate(sd1, caption, None, opts, progress=False, **sampling_kwargs(inv))
    torch.testing.assert_close(rec.latents, target, atol=0, rtol=0)
    free = generate(sd1, caption, None, opts, latent=inv.latent, uncond=inv.uncond, progress=False)
    assert torch.nn.functional.mse_loss(free.latents, target) > 1e-6  # without the pin, plain DDIM drifts

    recorded = []

    class Record(AttentionController):
        def step_end(self, step, timestep, latents):
            recorded.append(latents[0].clone())

    target_caption = caption.replace("square", "cross")
    r = edit(sd1, caption, target_caption, EditOptions(), opts, inversion=inv, progress=False, vanilla=False,
             extra=Record())
    for k, latents in enumerate(recorded):  # the other controllers see the pinned source at every step
        torch.testing.assert_close(latents, inv.path[k], atol=0, rtol=0)
    torch.testing.assert_close(r.controlled.latents[:1], target, atol=0, rtol=0)
    assert torch.nn.functional.mse_loss(r.controlled.latents[1:], target) > 1e-6  # the edit runs free

    back = Inversion.load(inv.save(tmp_path / "direct"))
    torch.testing.assert_close(back.path, inv.path, atol=0, rtol=0)
    with pytest.raises(InputError, match="latent path has shape"):
        generate(sd1, caption, None, GenerationOptions(steps=STEPS + 1), latent=inv.latent, path=inv.path,
                 progress=False)


def test_direct_method_from_the_command_line(tmp_path, sd1_folder, scene_image):
    caption, image = scene_image
    image.save(tmp_path / "in.png")
    inv = tmp_path / "inv.safetensors"
    main(["invert", str(tmp_path / "in.png"), caption, "--model", str(sd1_folder), "--method", "direct",
          "--steps", str(STEPS), "--out", str(inv), "--quiet"])
    loaded = Inversion.load(inv)
    assert loaded.options.method == "direct" and loaded.path.shape[0] == STEPS
    # the reconstruction is the autoencoder's: the pinned path ends at the image's own latent
    assert loaded.settings["psnr_vs_autoencoder"] > 60


def test_sdxl_ddim_inversion_conditions_as_the_pipeline(pipes, scene_image):
    """SDXL: the inversion's conditioning (both encoders, pooled embedding, added time ids, the pipeline's own
    unconditional rows) is the pipeline's: swapping the saved null embeddings in step by step equals plain sampling."""
    caption, image = scene_image
    pipe = pipes["sdxl"]
    inv = invert(pipe, image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    width = pipe.unet.config.cross_attention_dim
    assert inv.uncond.shape == (STEPS, 77, width) and inv.uncond_pooled is not None
    opts = GenerationOptions(steps=STEPS)
    from prompt2prompt.inversion import sampler, sampling_kwargs

    with sampler(pipe, inv):
        swapped = generate(pipe, caption, None, opts, progress=False, **sampling_kwargs(inv))
        plain = generate(pipe, caption, None, opts, latent=inv.latent, progress=False)
    torch.testing.assert_close(swapped.latents, plain.latents, atol=1e-5, rtol=1e-5)


def test_sdxl_null_text_retraces_and_edits(pipes, scene_image, tmp_path):
    """SDXL null-text: each step's loss falls, sampling from the saved file ends where the optimisation ended, closer
    than plain DDIM; an edit with local blend runs from it; the pooled unconditional embedding survives the file;
    an SDXL inversion is refused by a one-encoder pipeline."""
    caption, image = scene_image
    pipe = pipes["sdxl"]
    inv = invert(pipe, image, caption, InversionOptions(steps=STEPS, inner_steps=3), progress=False)
    assert all(final <= first * (1 + 1e-3) + 1e-9 for first, final in inv.settings["losses"])
    inv = Inversion.load(inv.save(tmp_path / "xl"))
    from prompt2prompt.inversion import sampler, sampling_kwargs

    target = encode(pipe, inv.image)
    opts = GenerationOptions(steps=STEPS, guidance=inv.options.guidance)  # sampled as it was inverted
    with sampler(pipe, inv):
        rec = generate(pipe, caption, None, opts, progress=False, **sampling_kwargs(inv))
    error = torch.nn.functional.mse_loss(rec.latents.float(), target).item()
    assert error == pytest.approx(inv.settings["losses"][-1][1], rel=1e-5, abs=1e-9)
    ddim = invert(pipe, image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    with sampler(pipe, ddim):
        plain = generate(pipe, caption, None, opts, progress=False, **sampling_kwargs(ddim))
    assert error < torch.nn.functional.mse_loss(plain.latents.float(), target).item()
    r = edit(pipe, caption, caption.replace("square", "cross"), EditOptions(blend=("square", "cross")), opts,
             inversion=inv, vanilla=False, progress=False)
    torch.testing.assert_close(r.controlled.latents[0], rec.latents[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="pass --model"):
        edit(pipes["sd1"], caption, caption, EditOptions(), inversion=inv, progress=False)


def test_sdxl_negative_prompt_and_direct(pipes, scene_image):
    """Negative-prompt inversion on SDXL puts the caption's pooled embedding in the unconditional rows too (so guidance
    cancels: sampling equals unguided sampling from the same latent); direct inversion reconstructs exactly."""
    caption, image = scene_image
    pipe = pipes["sdxl"]
    from prompt2prompt.inversion import sampler, sampling_kwargs

    npi = invert(pipe, image, caption, InversionOptions(method="negative-prompt", steps=STEPS), progress=False)
    with sampler(pipe, npi):
        guided = generate(pipe, caption, None, GenerationOptions(steps=STEPS), progress=False,
                          **sampling_kwargs(npi))
        unguided = generate(pipe, caption, None, GenerationOptions(steps=STEPS, guidance=1.0), latent=npi.latent,
                            progress=False)
    torch.testing.assert_close(guided.latents, unguided.latents, atol=1e-4, rtol=1e-4)
    direct = invert(pipe, image, caption, InversionOptions(method="direct", steps=STEPS), progress=False)
    with sampler(pipe, direct):
        rec = generate(pipe, caption, None, GenerationOptions(steps=STEPS), progress=False,
                       **sampling_kwargs(direct))
    torch.testing.assert_close(rec.latents, encode(pipe, direct.image), atol=0, rtol=0)


def test_sd2_v_prediction_inverts(pipes, scene_image):
    """On a v-prediction model null-text lowers every step's loss and sampling from it retraces the optimised path,
    closer to the image's latent than plain DDIM inversion."""
    caption, image = scene_image
    pipe = pipes["sd2"]
    inv = invert(pipe, image, caption, InversionOptions(steps=STEPS, inner_steps=3), progress=False)
    assert inv.uncond.shape == (STEPS, 77, 64)
    assert all(final <= first * (1 + 1e-3) + 1e-9 for first, final in inv.settings["losses"])
    target = encode(pipe, inv.image)
    opts = GenerationOptions(steps=STEPS)
    rec = generate(pipe, caption, None, opts, latent=inv.latent, uncond=inv.uncond, progress=False)
    error = torch.nn.functional.mse_loss(rec.latents.float(), target).item()
    assert error == pytest.approx(inv.settings["losses"][-1][1], rel=1e-5, abs=1e-9)
    ddim = invert(pipe, image, caption, InversionOptions(method="ddim", steps=STEPS), progress=False)
    plain = generate(pipe, caption, None, opts, latent=ddim.latent, uncond=ddim.uncond, progress=False)
    assert error < torch.nn.functional.mse_loss(plain.latents.float(), target).item()


def test_cli_invert_then_edit(sd1_folder, scene_image, tmp_path, capsys):
    caption, image = scene_image
    image.save(tmp_path / "scene.png")
    inv_path = tmp_path / "inv.safetensors"
    assert main(["invert", str(tmp_path / "scene.png"), caption, "--model", str(sd1_folder), "--steps", "3",
                 "--inner-steps", "2", "--out", str(inv_path), "--quiet"]) == 0
    assert inv_path.exists() and (tmp_path / "inv_reconstruction.png").exists()
    assert "dB against the input" in capsys.readouterr().out
    out = tmp_path / "edit"
    assert main(["edit", "--from", str(inv_path), caption, caption.replace("red", "green"), "--model",
                 str(sd1_folder), "--out", str(out), "--quiet"]) == 0
    assert (out / "grid.png").exists() and (out / "edit_1.png").exists()


def test_cli_invert_bad_image(sd1_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00\x01")
    out = tmp_path / "inv.safetensors"
    assert main(["invert", str(bad), "a circle", "--model", str(sd1_folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_ddim_steps_are_the_schedulers(pipes, kind):
    """prev() is DDIMScheduler.step (epsilon and v-prediction alike); for epsilon, next() undoes it exactly when the
    model output is held fixed (the inversion's approximation)."""
    from diffusers import DDIMScheduler

    from prompt2prompt.inversion import _DDIM

    pipe = pipes[kind]
    ddim = _DDIM(pipe.scheduler, 10)
    reference = DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(10)
    torch.manual_seed(0)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in ddim.timesteps[:-1]:
        want = reference.step(output, t, sample).prev_sample
        torch.testing.assert_close(ddim.prev(output, t, sample), want, atol=1e-5, rtol=1e-5)
        if kind == "sd1":
            torch.testing.assert_close(ddim.next(output, t, want), sample, atol=1e-4, rtol=1e-4)


def test_every_null_text_step_lowers_its_loss(null_text):
    losses = null_text.settings["losses"]
    assert len(losses) == STEPS
    for first, final in losses:
        assert final <= first * (1 + 1e-3) + 1e-9


def test_null_text_over_a_hundred_steps(sd1, scene_image):
    caption, image = scene_image
    inv = invert(sd1, image, caption, InversionOptions(steps=101, inner_steps=1, early_stop=0.0), progress=False)
    assert inv.uncond.shape[0] == 101 and len(inv.settings["losses"]) == 101


def test_inversion_options_are_checked_before_any_work():
    for bad, match in [({"steps": 0}, "whole number from 1 to 1000"),
                       ({"method": "null-text", "guidance": 1.0}, "guidance > 1"),
                       ({"guidance": float("inf")}, "finite"), ({"method": "edict"}, "unknown inversion method"),
                       ({"inner_steps": 0}, "whole number >= 1"), ({"lr": -1.0}, "lr"),
                       ({"offsets": (0, 0, -1, 0)}, "offsets"), ({"height": 0}, "height"),
                       ({"max_sequence_length": 0}, "max sequence length must be a positive number of tokens")]:
        with pytest.raises(InputError, match=match):
            InversionOptions(**bad)
    InversionOptions(method="ddim", guidance=1.0)  # plain DDIM needs no guidance


def test_auto_method_is_null_text_on_a_unet_model_and_checked_as_such(sd1, scene_image):
    caption, image = scene_image
    with pytest.raises(InputError, match="guidance > 1"):  # auto became null-text, which needs guidance
        invert(sd1, image, caption, InversionOptions(guidance=1.0, steps=2), progress=False)
    inv = invert(sd1, image, caption, InversionOptions(steps=2, inner_steps=1), progress=False)
    assert inv.options.method == "null-text" and inv.uncond.shape[0] == 2


def test_edit_from_an_inversion_gives_the_pipeline_back(sd1, null_text, scene_image):
    from diffusers import EulerDiscreteScheduler

    caption, _ = scene_image
    original = sd1.scheduler
    sd1.scheduler = mine = EulerDiscreteScheduler.from_config(original.config)
    try:
        edit(sd1, caption, caption.replace("square", "cross"), EditOptions(), inversion=null_text, vanilla=False,
             progress=False)
        invert(sd1, null_text.image, caption, InversionOptions(method="ddim", steps=2), progress=False)
        assert sd1.scheduler is mine
    finally:
        sd1.scheduler = original


def test_inversion_from_another_model_is_refused(pipes, null_text, scene_image):
    caption, _ = scene_image
    with pytest.raises(InputError, match="pass --model"):
        edit(pipes["sd2"], caption, caption, EditOptions(), inversion=null_text, progress=False)


def test_tiny_images_are_refused_and_conversions_reported():
    notes = []
    prepare_image(Image.new("LA", (40, 40)), (32, 32), notes=notes)
    assert notes == ["LA image: transparent pixels composited on white",
                     "centre-cropped and resized from 40x40 to 32x32"]
    with pytest.raises(InputError, match="enlarge it 32.0 times"):
        prepare_image(Image.new("RGB", (1, 1)), (32, 32))


def test_inversion_at_another_size(sd1, scene_image):
    caption, image = scene_image
    inv = invert(sd1, image, caption, InversionOptions(method="ddim", steps=2, height=48, width=64), progress=False)
    assert inv.image.size == (64, 48) and inv.latent.shape[-2:] == (24, 32)
