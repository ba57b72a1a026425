"""Hostile inputs: nothing of the user's is touched, nothing outside what a command owns is left, and every bad file,
study, signal and call gets one sentence (exit 2; signals 130 / 143) before any work it can be checked before.

Each case is one line: how to set it up, the command, the exit status and what the message must say; a check of the
folder follows every case (the user's files byte for byte the same, no hidden temporary files)."""

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from prompt2prompt.cli import main

CAPTION = "a red circle"


@pytest.fixture(scope="module")
def world(sd1_folder, tmp_path_factory):
    """A tiny model, an image, and a good inversion file to spoil."""
    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "red.png")
    inv = root / "good.safetensors"
    assert main(["invert", str(root / "red.png"), CAPTION, "--model", str(sd1_folder), "--method", "ddim", "--steps",
                 "2", "--out", str(inv), "--quiet"]) == 0
    with __import__("safetensors").safe_open(str(inv), "pt") as f:
        meta = json.loads(f.metadata()["p2p"])
    return {"root": root, "model": str(sd1_folder), "inv": inv, "meta": meta, "tensors": load_file(inv)}


def snapshot(folder: Path) -> dict:
    """Every file under folder (hidden ones too) with its bytes; links as their target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and (": error: " in line or not line.startswith(
        ("p2p invert: ", "p2p: warning")))]
    assert len(lines) == 1, err
    return lines[0]


def spoiled(world, folder: Path, name: str, meta=None, tensors=None, drop=()) -> Path:
    """A copy of the good inversion file with its metadata or tensors replaced."""
    meta = world["meta"] if meta is None else meta
    tensors = {**world["tensors"], **(tensors or {})}
    for key in drop:
        tensors.pop(key)
    path = folder / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"p2p": json.dumps(meta)})
    return path


def _opts(world, **change):
    return {**world["meta"], "options": {**world["meta"]["options"], **change}}


# (name, setup(world, folder) -> extra argv, argv after the model flags, expected exit, words in the message)
INVERT = ["invert", "{image}", CAPTION, "--method", "ddim", "--steps", "2"]
EDIT_FROM = ["edit", "--from", "{file}", CAPTION, "a red square"]  # the inversion's own steps
SPOILED = [  # hand-edited inversion files: refused before the model loads, with what is wrong
    ("metadata a list", dict(meta=["p2p_inversion"]), "holds no prompt2prompt inversion"),
    ("an unknown option", dict(meta="unknown"), "unknown option(s) 'sharpness'"),
    ("no prompt", dict(meta="no prompt"), "expected its caption (prompt) as text, got None"),
    ("a number as prompt", dict(meta="number prompt"), "expected its caption (prompt) as text, got 7"),
    ("null steps", dict(meta="null steps"), "steps must be a whole number"),
    ("null settings", dict(meta="null settings"), "expected its settings as a mapping, got NoneType"),
    ("offsets not a list", dict(meta="offsets"), "expected offsets as four whole numbers"),
    ("a float image", dict(tensors={"image": torch.rand(32, 32, 3)}), "tensor 'image' is torch.float32"),
    ("a 1-D image", dict(tensors={"image": torch.zeros(12, dtype=torch.uint8)}), "tensor 'image' is torch.uint8 "
     "with shape (12,)"),
    ("a latent of the wrong shape", dict(tensors={"latent": torch.zeros(1, 4, 7, 9)}), "does not fit its 32x32"),
    ("a 3-D latent", dict(tensors={"latent": torch.zeros(4, 16, 16)}), "tensor 'latent' is torch.float32 with "
     "shape (4, 16, 16)"),
    ("too few unconditional steps", dict(tensors={"uncond": torch.zeros(1, 77, 32)}), "has 1 steps; expected one "
     "per step (2)"),
    ("non-finite latent", dict(tensors={"latent": torch.full((1, 4, 16, 16), float("nan"))}), "non-finite"),
    ("no uncond tensor", dict(drop=("uncond",)), "lacks the tensor(s) uncond"),
]
META = {"unknown": lambda w: _opts(w, sharpness=3), "no prompt": lambda w: {k: v for k, v in w["meta"].items()
                                                                            if k != "prompt"},
        "number prompt": lambda w: {**w["meta"], "prompt": 7}, "null steps": lambda w: _opts(w, steps=None),
        "null settings": lambda w: {**w["meta"], "settings": None}, "offsets": lambda w: _opts(w, offsets=3)}


@pytest.mark.parametrize("name, spoil, message", SPOILED, ids=[s[0] for s in SPOILED])
def test_a_spoiled_inversion_file_is_one_sentence_before_the_model_loads(world, tmp_path, capsys, monkeypatch, name,
                                                                         spoil, message):
    from prompt2prompt import loading

    loads, real = [], loading.load_pipeline
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    meta = spoil.get("meta")
    meta = META[meta](world) if isinstance(meta, str) else meta
    path = spoiled(world, tmp_path, "spoiled.safetensors", meta, spoil.get("tensors"), spoil.get("drop", ()))
    before = snapshot(tmp_path)
    code, err = run(["edit", "--from", path, CAPTION, "a red square", "--model", world["model"], "--out",
                     tmp_path / "out", "--quiet"], capsys)
    line = one_sentence(err)
    if "does not fit" in message:  # needs the model's autoencoder factor: checked right after loading, before work
        assert code == 2 and message in line
    else:
        assert code == 2 and message in line and not loads, line
    assert snapshot(tmp_path) == before


def _foreign_file(folder):
    (folder / "x.safetensors").write_text("my thesis")
    return ["--out", folder / "x.safetensors"], "already exists and was not written by p2p"


def _foreign_reconstruction(folder):
    Image.new("RGB", (8, 8), "blue").save(folder / "x_reconstruction.png")
    return ["--out", folder / "x.safetensors"], "already exists and was not written by p2p"


def _link_out(folder):
    (folder / "victim.txt").write_text("keep")
    (folder / "x.safetensors").symlink_to(folder / "victim.txt")
    return ["--out", folder / "x.safetensors"], "is a link"


def _link_reconstruction(folder):
    (folder / "victim.txt").write_text("keep")
    (folder / "x_reconstruction.png").symlink_to(folder / "victim.txt")
    return ["--out", folder / "x.safetensors"], "is a link"


def _planted_temporary(folder):  # the old predictable temporary names, planted as links: never followed now
    (folder / "victim.txt").write_text("keep")
    for name in (".x_reconstruction.png.part", "x.tmp"):
        (folder / name).symlink_to(folder / "victim.txt")
    return ["--out", folder / "x.safetensors"], None


def _user_tmp(folder):
    (folder / "precious.tmp").write_text("draft")
    return ["--out", folder / "precious.safetensors"], None


def _missing_folder(folder):
    return ["--out", folder / "new" / "deeper" / "x.safetensors"], None


def _out_is_folder(folder):
    (folder / "x").mkdir()
    return ["--out", folder / "x"], "is a folder; expected a file"


def _bomb(folder):
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 million pixels, a few kB on disk
    return ["--image", folder / "bomb.png", "--out", folder / "x.safetensors"], "at most 40,000,000 pixels"


def _not_an_image(folder):
    (folder / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return ["--image", folder / "fake.png", "--out", folder / "x.safetensors"], "cannot read"


def _huge_size(folder):
    return ["--out", folder / "x.safetensors", "--height", "8192", "--width", "8192"], "height 8192 is over 4096"


INVERT_CASES = [  # (setup, exit status)
    (_foreign_file, 2), (_foreign_reconstruction, 2), (_link_out, 2), (_link_reconstruction, 2),
    (_planted_temporary, 0), (_user_tmp, 0), (_missing_folder, 0), (_out_is_folder, 2), (_bomb, 2),
    (_not_an_image, 2), (_huge_size, 2),
]


@pytest.mark.parametrize("setup, status", INVERT_CASES, ids=[c[0].__name__.strip("_") for c in INVERT_CASES])
def test_invert_never_touches_the_users_files(world, tmp_path, capsys, setup, status):
    extra, message = setup(tmp_path)
    image = world["root"] / "red.png"
    if "--image" in extra:
        i = extra.index("--image")
        image, extra = extra[i + 1], extra[:i] + extra[i + 2:]
    before = snapshot(tmp_path)
    code, err = run(["invert", image, CAPTION, "--method", "ddim", "--steps", "2", "--model", world["model"],
                     *extra, "--quiet"], capsys)
    assert code == status, err
    after = snapshot(tmp_path)
    for name, content in before.items():  # every file of the user's as it was (links too)
        assert after.get(name) == content, name
    if status == 2:
        assert message in one_sentence(err)
        assert after == before  # nothing written
    else:
        new = set(after) - set(before)
        out = Path(extra[extra.index("--out") + 1])
        stem = out.name.removesuffix(".safetensors")
        assert {Path(n).name for n in new} == {f"{stem}.safetensors", f"{stem}_reconstruction.png"}, new
        assert not [n for n in new if Path(n).name.startswith(".")]  # no temporary files left


def test_invert_replaces_its_own_files(world, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    for _ in range(2):  # the second run replaces the first run's inversion and reconstruction
        code, err = run(["invert", world["root"] / "red.png", CAPTION, "--method", "ddim", "--steps", "2",
                         "--model", world["model"], "--out", out, "--quiet"], capsys)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "x_reconstruction.png"]
    mode = os.stat(out).st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # readable as the umask says, not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_default_output_in_a_fresh_folder(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(["invert", world["root"] / "red.png", CAPTION, "--method", "ddim", "--steps", "2", "--model",
                     world["model"], "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "p2p-out" / "inversion.safetensors").exists()


def test_images_of_high_bit_depth_are_scaled_not_clipped(tmp_path):
    from prompt2prompt.images import read_image

    grey = np.full((16, 16), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    notes: list[str] = []
    image = read_image(tmp_path / "grey16.png", notes)
    assert image.mode == "L" and abs(np.asarray(image).mean() - 128) <= 1  # not 255 (white)
    assert "16-bit values scaled to 8 bits" in notes[0]
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")
    assert abs(np.asarray(read_image(floats)).mean() - 128) <= 1


def test_sigterm_while_writing_exits_143_and_leaves_nothing(world, tmp_path, capsys, monkeypatch):
    real_save = Image.Image.save

    def killed(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output folder is being written
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", killed)
    try:
        code, err = run(["edit", CAPTION, "a red square", "--model", world["model"], "--steps", "2", "--out",
                         tmp_path / "out", "--quiet"], capsys)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert code == 143 and err.strip().endswith("terminated; no unfinished output was kept")
    assert not list(tmp_path.iterdir())  # neither the folder nor its hidden temporary one


STUDY = {"model": "{model}", "generation": {"steps": 2}, "edits": [{"source": CAPTION, "target": "a red square"}],
         "measures": ["drift"]}


def _study(folder: Path, data=None, text: str | None = None, encoding: str = "utf-8", name: str = "study.yaml"):
    path = folder / name
    if text is None:
        text = yaml.safe_dump(data)
    path.write_bytes(text.encode(encoding))
    return path


ALIAS_BOMB = "name: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}, *{'a' if i == 0 else f'b{i - 1}'}]\n" for i in range(9))
SWEEP_CASES = [  # (name, study text or data, extra argv, exit status, message)
    ("an alias bomb", ALIAS_BOMB, [], 2, "may not use YAML aliases"),
    ("a million cases", {**STUDY, "grid": {"seed": list(range(1000)), "steps": list(range(1, 1001))}}, [], 2,
     "it expands to 1,000,000 cases"),
    ("a size the model refuses", {**STUDY, "generation": {"steps": 2, "height": 12}}, [], 2,
     "multiples of 8 for this model, got 12x32"),
    ("a word in no prompt", {**STUDY, "options": {"blend": ["hexagon"]}}, [], 2, "'hexagon'"),
    ("negative threads", STUDY, ["--threads", "-1"], 2, "expected a whole number >= 0"),
    ("offload without a GPU", STUDY, ["--offload", "model"], 2, "offload 'model'"),
    ("a missing model, two processes", {**STUDY, "model": "/nowhere/model"}, ["--processes", "2"], 2,
     "is neither a bundled model"),
    ("not text", b"\xff\xfe\x00".decode("latin-1"), [], 2, "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, study, extra, status, message", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_a_refused_study_leaves_nothing(world, tmp_path, capsys, name, study, extra, status, message):
    if torch.cuda.is_available() and "offload" in name:
        pytest.skip("a GPU machine accepts offloading")
    data = json.loads(json.dumps(study).replace("{model}", world["model"])) if isinstance(study, dict) else None
    path = _study(tmp_path, data, None if data else study, "latin-1" if name == "not text" else "utf-8")
    out = tmp_path / "sweep"
    code, err = run(["sweep", path, "--out", out, "--quiet", *extra], capsys)
    assert code == status and message in one_sentence(err), err
    assert not out.exists()


def test_a_utf16_study_is_read(world, tmp_path, capsys):
    data = json.loads(json.dumps(STUDY).replace("{model}", world["model"]))
    path = _study(tmp_path, text="\ufeff" + yaml.safe_dump(data), encoding="utf-16-le")
    code, err = run(["sweep", path, "--out", tmp_path / "sweep", "--quiet"], capsys)
    assert code == 0, err


def test_sweeps_resume_past_a_corrupt_record_and_a_killed_case_and_refuse_a_second_writer(world, tmp_path, capsys):
    from prompt2prompt.study import load
    from prompt2prompt.sweep import locked

    data = json.loads(json.dumps(STUDY).replace("{model}", world["model"]))
    data["grid"] = {"seed": [0, 1]}
    path = _study(tmp_path, data)
    out = tmp_path / "sweep"
    assert run(["sweep", path, "--out", out, "--quiet"], capsys)[0] == 0
    cases = sorted((out / "cases").iterdir())
    (cases[0] / "case.json").write_text("{truncated")  # a record cut short
    leftover = out / "cases" / f".{cases[1].name}-p999999-abc"  # a killed process's temporary case
    leftover.mkdir()
    code, err = run(["sweep", path, "--out", out], capsys)
    assert code == 0 and "computed 1" in err and "already there 1" in err, err
    assert json.loads((cases[0] / "case.json").read_text())["status"] == "ok" and not leftover.exists()
    with locked(out):  # another sweep is writing to the folder
        code, err = run(["sweep", path, "--out", out, "--quiet"], capsys)
    assert code == 2 and "another sweep is writing to" in one_sentence(err)
    other = {**data, "model": "shapes"}  # the same study on another model: none of its cases is there
    assert all(c.id not in {p.name for p in cases} for c in load(_study(tmp_path, other, name="other.yaml")).cases)


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


UI_CASES = [  # (argv, message); each refused before the model loads
    (["--port", "99999"], "--port must be from 1 to 65535, got 99999"),
    (["--host", "203.0.113.7"], "203.0.113.7:7860 cannot be used"),
    (["--host", "no-such-host.invalid"], "is not an address of this machine"),
]


@pytest.mark.parametrize("argv, message", UI_CASES, ids=[" ".join(c[0]) for c in UI_CASES])
def test_ui_checks_its_address_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    from prompt2prompt import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    code, err = run(["ui", *argv], capsys)
    assert code == 2 and message in one_sentence(err), err


def test_ui_without_gradio_says_how_to_install_it_after_checking_its_flags(capsys, monkeypatch):
    import socket
    import sys

    from prompt2prompt import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError, as without the extra
    code, err = run(["ui", "--port", "99999"], capsys)
    assert code == 2 and "--port must be from 1 to 65535" in one_sentence(err)
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    code, err = run(["ui", "--port", free], capsys)
    assert code == 2 and "p2p ui needs gradio: pip install -e '.[ui]'" in one_sentence(err)


def test_ui_refuses_a_busy_port(capsys, monkeypatch):
    from prompt2prompt import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with _busy_port() as busy:
        code, err = run(["ui", "--port", busy.getsockname()[1]], capsys)
    assert code == 2 and "is in use" in one_sentence(err)


def test_ui_refuses_too_many_targets_and_bad_uploads(sd1, tmp_path):
    from prompt2prompt.errors import InputError
    from prompt2prompt.ui import App

    app = App(sd1, "tiny")
    with pytest.raises(InputError, match="9 edited prompts were given; at most 8"):
        app.edit(CAPTION, "\n".join(["a red square"] * 9), steps=2)
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    with pytest.raises(InputError, match="the upload is 20000x20000 pixels"):
        app.invert(str(tmp_path / "bomb.png"), CAPTION, steps=2)


def test_words_cut_off_by_the_token_limit_say_so(sd1):
    from prompt2prompt.edits import EditOptions, edit_controllers
    from prompt2prompt.errors import PromptError

    long = " and ".join(["a blue square"] * 30) + " and a hexagon"
    with pytest.raises(PromptError, match="'hexagon' is in the part of prompt 1 the model never sees: it is longer "
                       "than the model's 77 tokens") as err:
        edit_controllers(sd1, [long, long.replace("hexagon", "circle")], EditOptions(blend=("hexagon",)))
    assert len(str(err.value)) < 300  # no pages of prompt text


def test_the_truncation_limit_is_the_models_own(tmp_path):
    from prompt2prompt.testing import tiny_pipeline
    from prompt2prompt.tokens import prompt_tokens

    flux = tiny_pipeline("flux", tmp_path / "flux")
    assert prompt_tokens(flux, CAPTION, 24).limit() == "24 tokens"  # the T5 sequence, not CLIP's 77
    sd3 = tiny_pipeline("sd3", tmp_path / "sd3")
    assert prompt_tokens(sd3, CAPTION, 24).limit() == "77 clip and 24 t5 tokens"
