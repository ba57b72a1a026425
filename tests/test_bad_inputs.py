"""Every bad input through the command line: exit status 2 (130 for Ctrl-C), one sentence that says what was
expected and what was given, no traceback, nothing written, and no model loaded where the input can be checked first."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from prompt2prompt import loading
from prompt2prompt.cli import main


@pytest.fixture(scope="module")
def folders(sd1_folder, pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "corrupt"
    shutil.copytree(sd1_folder, corrupt)
    (corrupt / "model_index.json").write_text("{not json")
    no_unet = root / "no-unet"
    shutil.copytree(sd1_folder, no_unet)
    shutil.rmtree(no_unet / "unet")
    sd2 = root / "sd2"
    pipes["sd2"].save_pretrained(sd2)
    (root / "a-file").write_text("x")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "red.png")
    (root / "fake.png").write_text("not an image")
    inv = root / "inv.safetensors"
    assert main(["invert", str(root / "red.png"), "a red circle", "--model", str(sd1_folder), "--method", "ddim",
                 "--steps", "2", "--out", str(inv), "--quiet"]) == 0
    return {"root": root, "sd1": str(sd1_folder), "corrupt": str(corrupt), "no_unet": str(no_unet), "sd2": str(sd2),
            "inv": str(inv)}


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


E = "a red circle"
CASES = [  # (argv, substrings of the message: what was expected and what was given, found only with the model)
    (["attend", E, "--steps", "0"], ["whole number from 1 to 1000", "'0'"], False),
    (["attend", E, "--steps", "-3"], ["whole number from 1 to 1000", "'-3'"], False),
    (["attend", E, "--guidance", "inf"], ["finite number >= 0", "'inf'"], False),
    (["attend", E, "--guidance", "nan"], ["finite number >= 0", "'nan'"], False),
    (["attend", E, "--seed", "-1"], ["whole number from 0 to 2**63 - 1", "'-1'"], False),
    (["edit", "--from-image", "x.png", E, E, "--seed", str(2**64)], ["from 0 to 2**63 - 1", str(2**64)], False),
    (["demo", "--seed", str(2**63)], ["from 0 to 2**63 - 1", str(2**63)], False),
    (["attend", E, "--components", "-1"], ["whole number >= 0", "'-1'"], False),
    (["attend", E, "--device", "cuda"], ["no CUDA GPU", "'cuda'"], False),
    (["attend", E, "--device", "cuda:7"], ["no CUDA GPU", "'cuda:7'"], False),
    (["attend", E, "--device", "mps"], ["MPS", "'mps'"], False),
    (["attend", E, "--device", "bogus"], ["expected cpu, cuda, cuda:N or mps", "'bogus'"], False),
    (["attend", E, "--fp16"], ["fp16 needs a GPU"], False),
    (["attend", ""], ["at least one word", "''"], False),
    (["attend", "   "], ["at least one word"], False),
    (["attend", E, "--height", "50"], ["multiples of", "50x32"], True),
    (["attend", E, "--model", "{corrupt}"], ["not valid JSON", "model_index.json"], True),
    (["attend", E, "--model", "{no_unet}"], ["unet/", "lacks the component"], True),
    (["attend", E, "--model", "{root}"], ["not a diffusers pipeline folder"], True),
    (["attend", E, "--out", "/proc/p2p-out"], ["cannot write", "/proc"], False),
    (["attend", E, "--out", "{root}/a-file/sub"], ["is a file, not a folder"], False),
    (["attend", E, "--out", "{root}/a-file"], ["is a file; expected a folder"], False),
    (["attend", E, "--out", "{root}/foreign"], ["holds files that p2p did not write"], False),
    (["edit", E, "a red square", "--reweight", "circle=nan"], ["finite factor", "'circle=nan'"], False),
    (["edit", E, "a red square", "--reweight", "circle=inf"], ["finite factor", "'circle=inf'"], False),
    (["edit", E, "a red square", "--reweight", "circle"], ["WORD=FACTOR", "'circle'"], False),
    (["edit", E, "a red square", "--threshold", "2"], ["> 0 and < 1", "'2'"], False),
    (["edit", E, "a red square", "--threshold", "-1"], ["> 0 and < 1", "'-1'"], False),
    (["edit", E, "a red square", "--blend-start", "2"], [">= 0 and <= 1", "'2'"], False),
    (["edit", E, "a red square", "--blend-start", "-1"], [">= 0 and <= 1", "'-1'"], False),
    (["edit", E, "a red square", "--cross-steps", "1.5"], ["fraction in [0, 1]", "1.5"], False),
    (["edit", E, "a red square", "--self-steps", "0.6,0.2"], ["pair 0 <= start <= end <= 1", "(0.6, 0.2)"], False),
    (["edit", E, E, "--mode", "reweight"], ["needs at least one word to re-weight"], False),
    (["edit", E, "a red square", "--blend", "lion"], ["'lion'", "is in none of the prompts"], True),
    (["edit", E, "a big red circle", "--mode", "replace"], ["same number of words", "'big'"], True),
    (["edit", E, "a red square", "--subtract", "red"], ["only make sense with blend words"], False),
    (["edit", E, "a red square", "--reference", "--blend", "circle"], ["pair with the prompts", "2 words"], True),
    (["edit", E, "", "--steps", "2"], ["at least one word"], False),
    (["edit", "--from", "{inv}", E, "a red square", "--model", "{sd2}"],
     ["made with a Stable Diffusion 1.x pipeline", "this pipeline is Stable Diffusion 2.x", "--model"], True),
    (["edit", "--from", "{inv}", "a blue cross", "a red square"], ["made with the caption 'a red circle'"], False),
    (["edit", "--from", "{root}/none.safetensors", E, "a red square"], ["no inversion file"], False),
    (["invert", "{root}/dot.png", E], ["enlarge it 32.0 times", "1x1"], True),
    (["invert", "{root}/missing.png", E], ["no image file"], False),
    (["invert", "{root}/fake.png", E], ["cannot read", "expected a PNG"], False),
    (["invert", "{root}/red.png", E, "--guidance", "1"], ["guidance > 1", "1.0"], False),
    (["invert", "{root}/red.png", E, "--out", "{root}/foreign"], ["is a folder; expected a file"], False),
    (["invert", "{root}/red.png", E, "--seed", "3"], ["unrecognized arguments: --seed"], False),
    (["swap-analysis", E, "a red square", "--threshold", "1"], ["< 1", "'1'"], False),
]


@pytest.mark.parametrize("argv, expected, needs_model", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_sentence(folders, capsys, monkeypatch, tmp_path, argv, expected, needs_model):
    argv = [a.format(**folders) for a in argv]
    loads = []
    real = loading.load_pipeline
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    argv = argv + (["--model", folders["sd1"]] if "--model" not in argv else [])
    argv = argv + (["--out", str(tmp_path / "out")] if "--out" not in argv else [])
    argv = argv + (["--steps", "2"] if "--steps" not in argv and argv[0] != "invert" and "--from" not in argv
                   else []) + ["--quiet"]
    code, err = run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith((f"p2p {argv[0]}: error: ", "p2p: error: ")) and len(lines) == 1, err
    assert all(s in message for s in expected), message
    assert not list(tmp_path.iterdir())  # nothing written
    if not needs_model:
        assert not loads, "this input can be checked before the model is loaded"


def test_ctrl_c_exits_130_and_leaves_nothing(folders, capsys, monkeypatch, tmp_path):
    import importlib

    attend_module = importlib.import_module("prompt2prompt.attend")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attend_module, "generate", interrupted)
    code, err = run(["attend", E, "--model", folders["sd1"], "--out", str(tmp_path / "out"), "--steps", "2",
                     "--quiet"], capsys)
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "p2p attend: interrupted; " \
        "no unfinished output was kept"
    assert not list(tmp_path.iterdir())


def test_a_folder_written_again_is_replaced_whole(folders, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["edit", E, "a red square", "--blend", "circle", "square", "--model", folders["sd1"], "--steps", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "blend_mask.png").exists()
    assert main(["attend", E, "--model", folders["sd1"], "--steps", "2", "--out", str(out), "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "blend_mask.png" not in names and "grid.png" not in names and "maps.safetensors" in names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch folders left beside it


def test_long_prompts_are_warned_and_laid_out_in_rows(folders, capsys, tmp_path):
    long = "a red circle and " + " and ".join(["a blue square"] * 30)
    out = tmp_path / "out"
    assert main(["attend", long, "--model", folders["sd1"], "--steps", "2", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "longer than the model's 77 tokens; it is cut before 'and a blue square" in err
    grid = Image.open(out / "cross_attention.png")
    assert grid.width < 1500 and grid.height > grid.width / 2  # rows of at most 8 maps, not a 10,000-pixel strip
    argmax = np.asarray(Image.open(out / "argmax.png").convert("RGB"))
    assert argmax.shape[1] < 1500


def test_conversions_are_reported(folders, capsys, tmp_path):
    Image.new("LA", (40, 40), (100, 0)).save(tmp_path / "la.png")
    out = tmp_path / "inv.safetensors"
    assert main(["invert", str(tmp_path / "la.png"), E, "--method", "ddim", "--steps", "2", "--model",
                 folders["sd1"], "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "LA image: transparent pixels composited on white" in err
    assert "centre-cropped and resized from 40x40 to 32x32" in err
    settings = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["p2p"])["settings"]
    assert len(settings["conversions"]) == 2
