import json
import re

from PIL import Image

from prompt2prompt.cli import main
from prompt2prompt.maps import CrossAttentionMaps


def test_attend_writes_every_file(sd1_folder, tmp_path, capsys):
    out = tmp_path / "attend"
    code = main(["attend", "a red circle and a blue square", "--model", str(sd1_folder), "--steps", "3",
                 "--seed", "7", "--out", str(out), "--quiet"])
    assert code == 0
    expected = {"image.png", "cross_attention.png", "overlays.png", "argmax.png", "self_attention.png",
                "maps.safetensors", "maps.json", "settings.json", "index.html"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        if name.endswith(".png"):
            Image.open(out / name).verify()
    assert Image.open(out / "image.png").size == (32, 32)
    maps = CrossAttentionMaps.load(out / "maps.safetensors")
    assert maps.settings["seed"] == 7 and maps.settings["steps"] == 3
    assert maps.settings["model"] == str(sd1_folder)
    assert maps.prompts[0].tokens[1:4] == ("a", "red", "circle")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a red circle and a blue square"]
    page = (out / "index.html").read_text()
    # self-contained: five embedded PNGs, no links to files
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 5
    assert "src='image.png'" not in page
    assert "index.html" in capsys.readouterr().out


def test_attend_bad_model_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["attend", "a circle", "--model", str(tmp_path), "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not a diffusers pipeline folder" in err and "Traceback" not in err
    assert not out.exists()


def test_failure_midway_leaves_nothing(sd1_folder, tmp_path, capsys):
    out = tmp_path / "bad-res"
    code = main(["attend", "a circle", "--model", str(sd1_folder), "--steps", "2", "--res", "5", "--out", str(out),
                 "--quiet"])
    assert code == 2
    assert "recorded sides" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".bad-res-*"))
