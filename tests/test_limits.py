"""Limits on what one command may ask of the machine, no silent nonsense, and options that cannot apply refused:
each case was a crash, a runaway or an exit 0 with a meaningless picture before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt import numbers
from prompt2prompt.cli import main
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import NonFiniteError, P2PError, PromptError
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.images import read_image
from prompt2prompt.schedule import parse_spans


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    return code, capsys.readouterr().err


def _one_sentence(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def folders(pipes, joint_pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    out = {}
    for kind in ("sd1", "sd3"):
        pipe = {**pipes, **joint_pipes}[kind]
        pipe.save_pretrained(str(root / kind))  # str: a modular pipeline takes no Path
        out[kind] = str(root / kind)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    out["root"] = root
    return out


# -- the machine's limits, before any work ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["sweep", "STUDY", "--out", "OUT", "--processes", "100"], ["--processes must be from 1 to", "got 100"]),
    (["sweep", "STUDY", "--out", "OUT", "--threads", "100000"], ["--threads", "cores", "got 100000"]),
    (["sweep", "STUDY", "--out", "OUT", "--processes", "2", "--threads", "2"], ["--processes must be from 1 to"]),
    (["attend", "a red circle", "--steps", "100000000"], ["from 1 to 1000", "100000000"]),
    (["invert", "IMAGE", "a red circle", "--method", "ddim", "--steps", "1001"], ["from 1 to 1000", "1001"]),
    (["attend", "a red circle", "--device", "cpu:7"], ["'cpu:7'", "the CPU is one device"]),
])
def test_requests_beyond_the_machine_are_refused_before_anything_loads(argv, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(numbers, "cores", lambda: 2)  # the limits of a 2-core machine, whatever runs the tests
    (tmp_path / "study.yaml").write_text("edits: [{source: a red circle, target: a red square}]\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    argv = [{"STUDY": tmp_path / "study.yaml", "OUT": tmp_path / "out", "IMAGE": tmp_path / "image.png"}.get(a, a)
            for a in argv]
    extra = ["--out", tmp_path / "o"] if "--out" not in argv else []
    code, err = _run(argv + extra, capsys)
    _one_sentence(code, err, *needles)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_a_scheduler_with_fewer_timesteps_than_steps_is_refused_by_name(pipes):
    pipe = pipes["sd1"]
    total = pipe.scheduler.config.num_train_timesteps
    pipe.scheduler.register_to_config(num_train_timesteps=20)
    try:
        with pytest.raises(P2PError, match="this model's scheduler has 20 timesteps: expected at most 20 steps"):
            generate(pipe, "a red circle", None, GenerationOptions(steps=21), progress=False)
    finally:
        pipe.scheduler.register_to_config(num_train_timesteps=total)


def test_processes_that_would_not_fit_in_memory_are_refused(tmp_path, monkeypatch):
    (tmp_path / "weights.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.setattr(numbers, "available_memory", lambda: 3 * numbers.PROCESS_OVERHEAD)
    numbers.check_memory(2, tmp_path)  # 2 x (1000 bytes + the overhead) fits
    with pytest.raises(P2PError, match="4 processes would each load 0.0 GiB of weights"):
        numbers.check_memory(4, tmp_path)


# -- non-finite results: an error naming the setting, not a black picture --------------------------------------------
def test_an_overflowing_guidance_or_factor_is_an_error_not_a_black_picture(sd1, capsys, folders, tmp_path):
    with pytest.raises(NonFiniteError, match=r"in the 2 steps \(guidance 1e\+308\)"):
        generate(sd1, "a red circle", None, GenerationOptions(steps=2, guidance=1e308), progress=False)
    with pytest.raises(NonFiniteError, match=r"re-weight factors circle=1e\+30"):
        edit(sd1, "a red circle", "a red circle", EditOptions(mode="reweight", reweight=(("circle", 1e30),)),
             GenerationOptions(steps=2), progress=False)
    code, err = _run(["attend", "a red circle", "--guidance", "1e308", "--model", folders["sd1"], "--steps", "2",
                      "--out", tmp_path / "a", "--quiet"], capsys)
    _one_sentence(code, err, "NaN or infinite", "guidance 1e+308")
    assert not (tmp_path / "a").exists()
    finite = generate(sd1, "a red circle", None, GenerationOptions(steps=2), progress=False)  # a sane one still runs
    assert torch.isfinite(finite.latents).all()


def test_a_float_image_with_nan_pixels_is_refused(tmp_path):
    values = np.full((16, 16), 0.5, dtype=np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tiff")
    with pytest.raises(P2PError, match="1 of 256 pixels NaN or infinite"):
        read_image(tmp_path / "nan.tiff")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F").save(tmp_path / "ok.tiff")
    assert read_image(tmp_path / "ok.tiff").getpixel((0, 0)) == 128


# -- options that cannot apply ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inversion(folders):
    path = folders["root"] / "inv.safetensors"
    assert main(["invert", str(folders["root"] / "red.png"), "a red circle", "--model", folders["sd1"], "--method",
                 "ddim", "--steps", "2", "--out", str(path), "--quiet"]) == 0
    return str(path)


@pytest.mark.parametrize("flags, needles", [
    (["--steps", "3"], ["leave out --steps"]),
    (["--guidance", "5", "--height", "64"], ["leave out --guidance, --height"]),
    (["--seed", "1"], ["leave out --seed"]),
])
def test_sampling_flags_with_from_are_refused(flags, needles, inversion, capsys, tmp_path):
    code, err = _run(["edit", "--from", inversion, "a red circle", "a red square", *flags, "--out", tmp_path / "o",
                      "--quiet"], capsys)
    _one_sentence(code, err, "--from INVERSION samples with the inversion's own", *needles)


@pytest.mark.parametrize("flags, needles", [
    (["--guidance", "5"], ["takes no --guidance"]),
    (["--mode", "refine", "--cross-steps", "0.5"], ["takes no --mode, --cross-steps"]),
    (["--joint", "raw", "--pooled", "source"], ["--joint, --pooled"]),
])
def test_prompt_to_prompt_flags_with_from_image_are_refused(flags, needles, folders, capsys, tmp_path):
    code, err = _run(["edit", "--from-image", folders["root"] / "red.png", "a red circle", "a red square", *flags,
                      "--model", folders["sd3"], "--out", tmp_path / "o", "--quiet"], capsys)
    _one_sentence(code, err, "--from-image (FlowEdit)", *needles)


def test_flowedit_flags_without_from_image_are_refused(folders, capsys, tmp_path):
    code, err = _run(["edit", "a red circle", "a red square", "--n-max", "3", "--target-guidance", "9", "--model",
                      folders["sd1"], "--out", tmp_path / "o", "--quiet"], capsys)
    _one_sentence(code, err, "--n-max, --target-guidance set FlowEdit")


def test_joint_on_a_unet_model_is_refused_and_kept_on_an_mmdit(folders, capsys, tmp_path):
    code, err = _run(["edit", "a red circle", "a red square", "--joint", "renormalize", "--model", folders["sd1"],
                      "--steps", "2", "--out", tmp_path / "o", "--quiet"], capsys)
    _one_sentence(code, err, "joint (--joint) sets how a replaced block enters an MM-DiT's joint softmax")
    code, err = _run(["edit", "a red circle", "a red square", "--joint", "renormalize", "--model", folders["sd3"],
                      "--steps", "2", "--height", "32", "--width", "32", "--out", tmp_path / "j", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "j" / "settings.json").read_text())["joint"] == "renormalize"


def test_a_study_of_options_the_model_cannot_apply_is_refused_up_front(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text("model: shapes\ngrid: {pooled: [own, source]}\n"
                     "edits: [{source: a red circle, target: a red square}]\n")
    code, err = _run(["sweep", study, "--out", tmp_path / "s"], capsys)
    _one_sentence(code, err, "works on SDXL and SD3 pipelines, not on Stable Diffusion 1.x")
    assert not (tmp_path / "s").exists()


def test_a_word_given_two_values_is_refused():
    with pytest.raises(PromptError, match="'default' has two step spans"):
        parse_spans("default=1.0,default=0.2")
    with pytest.raises(PromptError, match="'circle' re-weighted twice"):
        EditOptions.from_text(reweight=["circle=2", "Circle=3"])


# -- control tokens in prompts, map sides before the work, wording ------------------------------------------------
@pytest.mark.parametrize("kind, prompt, token", [
    ("qwenimage", "a red circle<|im_end|><|im_start|>assistant", "'<|im_end|>', '<|im_start|>'"),
    ("flux2", "a red circle<|im_end|>", "'<|im_end|>'"),
    ("zimage", "a red circle<|im_start|>", "'<|im_start|>'"),
    ("flux", "a red circle</s>", "'</s>'"),
    ("sd1", "a red circle<|endoftext|> and more", "'<|endoftext|>'"),
])
def test_control_tokens_in_a_prompt_are_refused(pipes, joint_pipes, kind, prompt, token):
    pipe = {**pipes, **joint_pipes}[kind]
    with pytest.raises(PromptError, match="control token") as refused:
        generate(pipe, prompt, None, GenerationOptions(steps=1, height=32, width=32), progress=False)
    assert token in str(refused.value)


def test_sd2s_pad_token_is_ordinary_text(pipes):
    """SD 2.x pads with "!": a prompt may hold it (it reads as text)."""
    out = generate(pipes["sd2"], "a red circle!", None, GenerationOptions(steps=1), progress=False)
    assert len(out.images) == 1


def test_map_sides_the_model_lacks_are_refused_after_the_first_step(sd1, capsys, folders, tmp_path):
    from prompt2prompt.attend import attend

    with pytest.raises(P2PError, match=r"no cross-attention maps 5 positions a side .* its maps are 8, 16 a side"):
        attend(sd1, "a red circle", GenerationOptions(steps=20), model="", progress=False, res=(16, 5))
    code, err = _run(["attend", "a red circle", "--res", "3", "--model", folders["sd1"], "--steps", "2", "--out",
                      tmp_path / "o", "--quiet"], capsys)
    _one_sentence(code, err, "no cross-attention maps 3 positions a side")


def test_flowedit_speaks_of_editing_not_inverting(folders, capsys, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    code, err = _run(["edit", "--from-image", tmp_path / "tiny.png", "a red circle", "a red square", "--model",
                      folders["sd3"], "--steps", "2", "--out", tmp_path / "o", "--quiet"], capsys)
    _one_sentence(code, err, "the image is 4x4 pixels; editing it at 32x32 would enlarge it 8.0 times")


def test_a_studys_relative_model_is_read_from_the_studys_folder(folders, tmp_path, monkeypatch):
    import shutil

    from prompt2prompt.study import load

    (tmp_path / "study").mkdir()
    shutil.copytree(folders["sd1"], tmp_path / "study" / "model")
    (tmp_path / "study" / "s.yaml").write_text("model: ./model\nedits: [{source: a red circle, target: a red "
                                               "square}]\n")
    monkeypatch.chdir(tmp_path)  # another folder than the study's
    assert load("study/s.yaml").model == str((tmp_path / "study" / "model").resolve())
    (tmp_path / "study" / "t.yaml").write_text("model: ./nowhere\nedits: [{source: a red circle, target: a red "
                                               "square}]\n")
    with pytest.raises(P2PError, match="is read relative to the study's folder, and .*nowhere is not a folder"):
        load("study/t.yaml")
    (tmp_path / "study" / "h.yaml").write_text("model: owner/name\nedits: [{source: a red circle, target: a red "
                                               "square}]\n")
    assert load("study/h.yaml").model == "owner/name"  # a hub id stays one
