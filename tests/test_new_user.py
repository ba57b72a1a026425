"""What a new user trips on, each fixed where it belongs: the inversion file's model as `edit --from`'s default, a
family's default size from its adapter, a templated family's text limit, `--pooled source` where it means something,
seeds and factors checked before torch sees them, controllers that are plain objects, and help that tells the truth."""

from __future__ import annotations

import json
import random

import pytest
import torch

from prompt2prompt.cli import main
from prompt2prompt.edits import EditOptions, _source_pooled, edit, edit_controllers
from prompt2prompt.errors import P2PError, PromptError
from prompt2prompt.families import FAMILIES
from prompt2prompt.generation import GenerationOptions, generate, image_size_for, native_size
from prompt2prompt.inversion import Inversion, inversion_model
from prompt2prompt.shapes import world


def _photo(path):
    world.scene_from_caption("a red circle and a blue square", random.Random(0)).image().save(path)


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def folders(joint_pipes, pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("new-user")
    out = {}
    for kind, pipe in {**pipes, **joint_pipes}.items():
        pipe.save_pretrained(str(root / kind))  # str: a modular pipeline takes no Path
        out[kind] = root / kind
    _photo(root / "photo.png")
    out["root"] = root
    return out


def test_an_edit_from_an_inversion_uses_the_model_the_file_records(folders, capsys, tmp_path, monkeypatch):
    """The README's `p2p edit --from inv.safetensors ...` without --model, on a Flux.1 inversion (before: it loaded the
    bundled shapes and refused the file); from another folder than the one it was inverted in, by a relative path."""
    monkeypatch.chdir(folders["root"])
    inv = tmp_path / "inv.safetensors"
    code, err = _run(["invert", "photo.png", "a red circle and a blue square", "--model", "flux", "--steps", "2",
                      "--height", "32", "--width", "32", "--out", str(inv), "--quiet"], capsys)
    assert code == 0, err
    assert Inversion.load(inv).settings["model"] == str(folders["flux"].resolve())  # absolute: usable from anywhere
    monkeypatch.chdir(tmp_path)
    code, err = _run(["edit", "--from", str(inv), "a red circle and a blue square", "a red circle and a green square",
                      "--blend", "square", "--out", "edit", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "edit" / "settings.json").read_text())["model"] == str(folders["flux"].resolve())
    code, err = _run(["edit", "--from", str(inv), "a red circle and a blue square", "a red circle and a green square",
                      "--model", str(folders["sd3"]), "--out", "other", "--quiet"], capsys)
    assert code == 2 and "made with a Flux.1 pipeline" in err and f"pass --model {folders['flux'].resolve()}" in err
    assert not (tmp_path / "other").exists()


def test_an_inversion_whose_model_folder_is_gone_says_so(tmp_path):
    class Recorded:  # what inversion_model reads of an Inversion
        settings = {"model": str(tmp_path / "gone")}

    with pytest.raises(P2PError, match="not there now: pass --model"):
        inversion_model(Recorded())
    Recorded.settings = {"model": "shapes"}
    assert inversion_model(Recorded()) == "shapes"
    Recorded.settings = {}
    with pytest.raises(P2PError, match="does not record the model"):
        inversion_model(Recorded())


def test_zimage_size_comes_from_its_adapter(joint_pipes, folders, capsys, tmp_path):
    """Z-Image's transformer has no sample_size: its pipeline draws 1024 px, within what its rotary table positions
    (the tiny model's axes_lens 32 tokens a side of 2x2 latent cells of 2 px: 128 px). Before: an AttributeError."""
    pipe = joint_pipes["zimage"]
    config = pipe.transformer.config
    side = config.axes_lens[1] * config.all_patch_size[0] * pipe.vae_scale_factor
    assert native_size(pipe) == (min(1024, side), min(1024, side)) == (128, 128)
    code, err = _run(["attend", "a red circle and a blue square", "--model", str(folders["zimage"]), "--steps", "2",
                      "--out", str(tmp_path / "a"), "--quiet"], capsys)
    assert code == 0, err
    from PIL import Image

    assert Image.open(tmp_path / "a" / "image.png").size == (128, 128)
    with pytest.raises(P2PError, match="up to 128x128 pixels"):
        image_size_for(pipe, 256, 64)
    code, err = _run(["edit", "a red circle", "a blue circle", "--model", str(folders["zimage"]), "--height", "256",
                      "--steps", "2", "--out", str(tmp_path / "e"), "--quiet"], capsys)
    assert code == 2 and "got 256x128" in err and not (tmp_path / "e").exists()


def test_every_other_family_draws_its_pipelines_own_default_size(pipes, joint_pipes):
    for kind, pipe in {**pipes, **joint_pipes}.items():
        if kind == "zimage":
            continue
        if kind == "qwenimage21":  # a square of its `output_resolution` (1024), the side it draws when given none
            assert native_size(pipe) == (1024, 1024)
            continue
        if kind == "flux3":  # its latent step's default height and width (1024), the size it draws when given none
            assert native_size(pipe) == (1024, 1024)
            continue
        sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
        assert native_size(pipe) == (sample * pipe.vae_scale_factor,) * 2, kind


def test_a_prompt_longer_than_zimage_can_position_is_refused_by_name(joint_pipes, folders, capsys, tmp_path):
    long = " ".join(["a red circle and a blue square"] * 40)  # about 300 words
    code, err = _run(["attend", long, "--model", str(folders["zimage"]), "--steps", "2", "--out", str(tmp_path / "z"),
                      "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "this model positions at most 224" in err and "axes_lens[0] = 256" in err
    with pytest.raises(PromptError, match="positions at most 224"):
        generate(joint_pipes["zimage"], long, None, GenerationOptions(steps=1, height=32, width=32), progress=False)
    for kind in ("flux2", "qwenimage"):  # the other templated families: cut at their max_sequence_length, said so
        code, err = _run(["attend", long * 2, "--model", str(folders[kind]), "--steps", "2", "--height", "32",
                          "--width", "32", "--out", str(tmp_path / kind)], capsys)
        assert code == 0 and "longer than the model's 512 tokens" in err, (kind, err)


def test_pooled_source_gives_every_prompt_the_sources_pooled_embedding_on_sd3(joint_pipes):
    """SD3's encode_prompt needs prompt_2 and prompt_3 (before: a TypeError); every encoder reads the prompts."""
    pipe = joint_pipes["sd3"]
    prompts = ["a red circle", "a blue square"]
    kwargs = _source_pooled(pipe, prompts, GenerationOptions(steps=2))
    pooled = kwargs["pooled_prompt_embeds"]
    assert torch.equal(pooled[1], pooled[0])
    with torch.no_grad():  # the stock pipeline's own encoding of the source
        _, _, own, _ = pipe.encode_prompt(prompts[0], prompts[0], prompts[0], do_classifier_free_guidance=False)
        embeds, _, _, _ = pipe.encode_prompt(prompts[1], prompts[1], prompts[1], do_classifier_free_guidance=False)
    torch.testing.assert_close(pooled[0], own[0])
    torch.testing.assert_close(kwargs["prompt_embeds"][1], embeds[0])  # each prompt keeps its own sequence
    r = edit(pipe, *prompts, EditOptions(pooled="source"), GenerationOptions(steps=2, height=32, width=32),
             vanilla=False, progress=False)
    plain = edit(pipe, *prompts, EditOptions(), GenerationOptions(steps=2, height=32, width=32), vanilla=False,
                 progress=False)
    assert torch.equal(r.controlled.latents[0], plain.controlled.latents[0])  # the source is its own either way
    assert not torch.equal(r.controlled.latents[1], plain.controlled.latents[1])


@pytest.mark.parametrize("kind", ["sd1", "flux", "zimage"])
def test_pooled_source_is_refused_where_it_would_change_nothing(joint_pipes, pipes, kind):
    pipe = {**pipes, **joint_pipes}[kind]
    with pytest.raises(PromptError, match=f"works on SDXL and SD3 pipelines, not on {FAMILIES[kind].title}"):
        edit(pipe, "a red circle", "a blue circle", EditOptions(pooled="source"),
             GenerationOptions(steps=1, height=32, width=32), progress=False)


class PlainRecorder:
    """A controller that is a plain object: wants / attention / step_end, no begin, no base class."""

    def __init__(self):
        self.calls, self.steps = 0, []

    def wants(self, site):
        return site.layer.is_cross

    def attention(self, probs, site):
        self.calls += 1
        return None

    def step_end(self, step, timestep, latents):
        self.steps.append(step)
        return None


def test_any_object_with_wants_attention_and_step_end_is_a_controller(sd1):
    from prompt2prompt.routing import Controllers

    plain = generate(sd1, "a red circle", None, GenerationOptions(steps=3), progress=False)
    for controller in (PlainRecorder(), Controllers(PlainRecorder())):
        out = generate(sd1, "a red circle", controller, GenerationOptions(steps=3), progress=False)
        seen = controller if isinstance(controller, PlainRecorder) else controller.controllers[0]
        assert seen.steps == [0, 1, 2] and seen.calls > 0
        torch.testing.assert_close(out.latents, plain.latents, atol=1e-4, rtol=1e-4)  # explicit vs fused softmax


@pytest.mark.parametrize("factor", ["1e308", "-1e308", "1e39"])
def test_a_factor_beyond_float32_is_one_sentence(factor, capsys, tmp_path, folders):
    """Before: 'value cannot be converted to type float without overflow' from deep inside torch."""
    code, err = _run(["edit", "a red circle", "--reweight", f"circle={factor}", "--model", str(folders["sd1"]),
                      "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "float32's range" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(PromptError, match="float32's range"):
        EditOptions.from_text(reweight=[f"circle={factor}"])
    with pytest.raises(P2PError, match="within"):
        EditOptions(mode="reweight", reweight=(("circle", float(factor)),))


def test_a_factor_beyond_the_models_dtype_is_refused_before_the_edit(pipes):
    """fp16 holds up to 65504: a re-weighted map going back to a half-precision model must hold the factor."""
    pipe = pipes["sd1"]
    options = EditOptions(mode="reweight", reweight=(("circle", 1e5),))
    edit_controllers(pipe, ["a red circle", "a red circle"], options)  # fine in float32
    pipe.unet.to(torch.float16)
    try:
        with pytest.raises(P2PError, match=r"within \+-6.55e\+04, the range of the model's float16"):
            edit_controllers(pipe, ["a red circle", "a red circle"], options)
    finally:
        pipe.unet.to(torch.float32)


def test_a_study_with_a_factor_beyond_float32_is_refused(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("model: shapes\nedits:\n  - source: a red circle\n    target: a red circle\n"
                     "    options: {mode: reweight, reweight: {circle: 1.0e+308}}\n")
    code, err = _run(["sweep", str(study), "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "Traceback" not in err and "within" in err, err
    assert not (tmp_path / "s").exists()


def test_invert_help_names_the_families_that_invert(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "not supported yet" not in text and "rf-solver" in text
    for family in FAMILIES.values():
        assert family.title in text, family.title
    inverts, _, not_yet = text.partition("pipelines (not yet:")  # "not yet" only while a family cannot invert
    not_yet = not_yet.split(")")[0]
    for family in FAMILIES.values():
        assert (family.title in inverts, family.title in not_yet) == (family.invertible, not family.invertible)
