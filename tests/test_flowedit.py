"""FlowEdit (flowedit.py) on tiny random SD3 and Flux.1 pipelines (the two exactness checks on every family it runs
on): the same prompt gives the image back exactly, n_max 0
moves nothing, an edit moves the latent by the velocity differences it sums, seeded, with the family's defaults; a
local blend keeps the latent outside its mask exactly; bad options and a UNet pipeline get one sentence."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.errors import InputError, ModelError, PromptError
from prompt2prompt.families import FAMILIES
from prompt2prompt.flowedit import FlowEditOptions, flowedit
from prompt2prompt.inversion import encode
from prompt2prompt.testing import KINDS

SIZE = dict(height=32, width=32)


def _picture() -> Image.Image:
    rng = np.random.default_rng(1)
    a = np.full((32, 32, 3), 70, np.uint8)
    a[8:24, 6:22] = (210, 50, 40)
    return Image.fromarray(np.clip(a + rng.integers(0, 8, a.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, joint_pipes):
    return joint_pipes[request.param]


@pytest.fixture(scope="module", params=[k for k in KINDS if FAMILIES[k].flowedit is not None])
def any_pipe(request, joint_pipes):
    """Every family FlowEdit runs on (the two exactness checks run on each)."""
    return joint_pipes[request.param]


def test_the_same_prompt_and_guidance_give_the_image_back(any_pipe):
    pipe = any_pipe
    image = _picture()
    same = flowedit(pipe, image, "a red square", "a red square",
                    FlowEditOptions(steps=6, n_max=4, source_guidance=2.0, target_guidance=2.0, **SIZE),
                    progress=False)
    torch.testing.assert_close(same.latent, encode(pipe, same.source).cpu(), atol=1e-5, rtol=0)


def test_an_edit_moves_the_latent_and_is_seeded(pipe):
    image = _picture()
    options = FlowEditOptions(steps=6, n_max=4, **SIZE)
    a = flowedit(pipe, image, "a red square", "a blue circle", options, progress=False)
    b = flowedit(pipe, image, "a red square", "a blue circle", options, progress=False)
    torch.testing.assert_close(a.latent, b.latent, atol=0, rtol=0)  # the noise draws are seeded
    source = encode(pipe, a.source).cpu()
    assert (a.latent - source).abs().max() > 1e-3  # the target's velocities moved it
    other = flowedit(pipe, image, "a red square", "a blue circle", FlowEditOptions(steps=6, n_max=4, seed=1, **SIZE),
                     progress=False)
    assert not torch.allclose(other.latent, a.latent)
    still = flowedit(pipe, image, "a red square", "a blue circle", FlowEditOptions(steps=6, n_max=0, **SIZE),
                     progress=False)
    torch.testing.assert_close(still.latent, source, atol=1e-6, rtol=0)  # no step walked: the image itself
    assert a.image.size == image.size and a.settings["model_calls"] == 8 and a.settings["method"] == "flowedit"


def test_family_defaults_fill_what_is_not_given(pipe):
    resolved = FlowEditOptions().resolved(pipe)
    from prompt2prompt.families import family_of

    expected = {"sd3": (50, 33, 3.5, 13.5), "flux": (28, 24, 1.5, 5.5)}[family_of(pipe).name]
    assert (resolved.steps, resolved.n_max, resolved.source_guidance, resolved.target_guidance) == expected
    assert FlowEditOptions(steps=10).resolved(pipe).n_max == 10  # at most the steps there are


def test_bad_options_and_models_are_one_sentence(pipe, pipes):
    for bad, match in [(dict(n_avg=0), "n avg must be a whole number >= 1"),
                       (dict(target_guidance=float("nan")), "target guidance must be a finite number"),
                       (dict(steps=True), "steps must be a whole number")]:
        with pytest.raises(InputError, match=match):
            FlowEditOptions(**bad)
    with pytest.raises(InputError, match="expected at most 5, got 6"):
        flowedit(pipe, _picture(), "a", "b", FlowEditOptions(steps=5, n_max=6), progress=False)
    with pytest.raises(PromptError, match="target prompt"):
        flowedit(pipe, _picture(), "a red square", " ", FlowEditOptions(steps=2, **SIZE), progress=False)
    with pytest.raises(ModelError, match="FlowEdit runs on Stable Diffusion 3 / 3.5, .*; this is Stable Diffusion"):
        flowedit(pipes["sd1"], _picture(), "a", "b", progress=False)


def test_blend_keeps_the_latent_outside_the_mask_exactly(any_pipe):
    """FlowEdit with a local blend (this project's addition): outside the blend words' mask the edited latent is the
    image's own, exactly; inside it moved as FlowEdit moves it; the mask is the union of both prompts' maps."""
    pipe = any_pipe
    from prompt2prompt.families import family_of
    from prompt2prompt.images import prepare_image

    side = family_of(pipe).tiny_side  # 8x8 image tokens
    options = FlowEditOptions(steps=4, blend=("square",), threshold=0.9, max_sequence_length=16, height=side,
                              width=side)
    blended = flowedit(pipe, _picture(), "a red square", "a blue square", options, progress=False)
    plain = flowedit(pipe, _picture(), "a red square", "a blue square", replace(options, blend=()), progress=False)
    own = encode(pipe, prepare_image(_picture(), (side, side)))  # (1, channels, h, w)
    mask = blended.mask[0, 0]  # (h, w) at the latent's size, also for Flux's packed tokens
    assert mask.shape == own.shape[2:] and 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(blended.latent[0][:, ~mask], own[0][:, ~mask], atol=0, rtol=0)
    assert (plain.latent[0][:, ~mask] - own[0][:, ~mask]).abs().max() > 1e-3  # without it, there moved too
    assert (blended.latent[0][:, mask] - own[0][:, mask]).abs().max() > 1e-3
    assert plain.mask is None and blended.settings["blend"] == ("square",)
    with pytest.raises(InputError, match="need blend words"):
        FlowEditOptions(subtract=("red",))


def test_cli_edit_from_image_on_a_saved_flux_folder(joint_pipes, tmp_path, capsys):
    import json

    from prompt2prompt.cli import main

    folder = tmp_path / "flux"
    joint_pipes["flux"].save_pretrained(folder)
    _picture().save(tmp_path / "in.png")
    out = tmp_path / "edit"
    assert main(["edit", "a red square", "a blue circle", "--from-image", str(tmp_path / "in.png"), "--model",
                 str(folder), "--steps", "6", "--n-max", "4", "--height", "32", "--width", "32", "--out", str(out),
                 "--quiet"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "flowedit" and settings["steps"] == 6 and settings["n_max"] == 4
    assert settings["source_guidance"] == 1.5 and settings["target_guidance"] == 5.5  # Flux's defaults
    assert {p.name for p in out.iterdir()} >= {"input.png", "edit.png", "grid.png", "index.html", "settings.json"}
    blended = tmp_path / "blended"
    assert main(["edit", "a red square", "a blue square", "--from-image", str(tmp_path / "in.png"), "--model",
                 str(folder), "--steps", "6", "--n-max", "4", "--height", "32", "--width", "32", "--blend", "square",
                 "--threshold", "0.9", "--out", str(blended), "--quiet"]) == 0
    assert (blended / "blend_mask.png").exists() and "outside the mask" in (blended / "index.html").read_text()
    image = str(tmp_path / "in.png")
    capsys.readouterr()  # what saving and the first run printed
    for argv, said in [(["a red square", "--from-image", image], "expected SOURCE TARGET, got 1 prompt"),
                       (["a red square", "a blue circle", "--from-image", image, "--reweight", "square=2"],
                        "takes no --reweight"),
                       (["a red square", "a blue circle", "--from-image", image, "--blend", "hexagon", "--height",
                         "32", "--width", "32"], "the blend word 'hexagon' is in none of the prompts"),
                       (["a red square", "a blue circle", "--from-image", str(tmp_path / "missing.png")], "missing")]:
        assert main(["edit", *argv, "--model", str(folder), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
