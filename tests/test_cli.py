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
    assert {p.name for p in out.iterdir()} == expected | {".p2p"}
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
    assert "its maps are" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".bad-res-*"))


def test_edit_writes_grid_images_settings_and_page(sd1_folder, tmp_path):
    out = tmp_path / "edit"
    code = main(["edit", "a red circle and a blue square", "a red circle and a blue cross", "a red circle and a "
                 "green square", "--blend", "square", "cross", "--cross-steps", "default=0.8,cross=0.4",
                 "--reweight", "red=2", "--model", str(sd1_folder), "--steps", "4", "--out", str(out), "--quiet"])
    assert code == 0
    names = {p.name for p in out.iterdir()} - {".p2p"}
    assert names == {"grid.png", "source.png", "edit_1.png", "edit_2.png", "vanilla_source.png",
                     "vanilla_edit_1.png", "vanilla_edit_2.png", "blend_mask.png", "settings.json", "index.html"}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "replace" and settings["blend"] == ["square", "cross"]
    assert settings["cross_steps"] == {"default": 0.8, "cross": 0.4} and settings["reweight"] == [["red", 2.0]]
    assert settings["prompts"][0] == "a red circle and a blue square"
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 160 and grid.height > 2 * 160  # three columns, two rows
    assert (out / "index.html").read_text().count("data:image/png;base64,") == 2


def test_edit_errors_name_the_word_and_write_nothing(sd1_folder, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["edit", "a red circle", "a red square", "--blend", "lion", "--model", str(sd1_folder), "--steps",
                 "2", "--out", str(out), "--quiet"])
    assert code == 2
    assert "'lion'" in capsys.readouterr().err
    code = main(["edit", "a circle", "a red circle", "--mode", "replace", "--model", str(sd1_folder), "--steps",
                 "2", "--out", str(out), "--quiet"])
    assert code == 2
    assert "'red'" in capsys.readouterr().err
    assert not out.exists()


def test_swap_analysis_numbers_and_plot(sd1_folder, tmp_path, capsys):
    out = tmp_path / "swap"
    code = main(["swap-analysis", "a red circle", "a red square", "--model", str(sd1_folder), "--steps", "5",
                 "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "swap_analysis.json").read_text())
    assert 0.0 <= data["argmax_changed"] <= 1.0
    assert len(data["drift_vanilla"]) == len(data["drift_controlled"]) == 5
    assert all(v >= 0 for v in data["drift_vanilla"] + data["drift_controlled"])
    for name in ("drift.png", "images.png", "argmax_step0_0.png", "argmax_step0_1.png", "index.html"):
        assert (out / name).exists()
    assert "of pixels change their most-attended word" in capsys.readouterr().out


def test_demo_quick_writes_a_report_with_finite_numbers(sd1_folder, tmp_path):
    import math

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(sd1_folder), "--out", str(out), "--quiet"]) == 0
    numbers = json.loads((out / "demo.json").read_text())
    assert set(numbers) >= {"swap", "blend", "sweep", "swap_analysis", "pairs", "settings", "seconds"}
    flat = [numbers["swap"]["replace"]["outside_psnr"], numbers["blend"]["replace+blend"]["outside_mad"],
            numbers["swap_analysis"]["argmax_changed"], *numbers["swap_analysis"]["drift_vanilla"],
            numbers["pairs"]["replace"]["outside_psnr"]]
    assert all(math.isfinite(x) for x in flat)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 12
    for section in ("1. What each word attends to", "2. One word changed", "3. Keeping the rest exactly",
                    "4. How long to inject", "5. Refine and re-weight", "6. Why one word moves everything",
                    "7. Measured over"):
        assert section in page
    # the texts say what the pictures' measurements say
    import html

    text = html.unescape(page)
    for w, area in numbers["reweight"].items():
        assert f"{area:.1%} at x{w}" in text
    drawn = [f for f, s in numbers["sweep"].items() if s["edit_ok"]]
    assert ("no fraction drew the triangle" in text) == (not drawn)
    assert f"IoU {numbers['refine']['objects_iou']['refine']:.2f}" in text


def test_reweight_takes_one_prompt_and_every_title_names_the_mode_and_words(sd1_folder, tmp_path, capsys):
    from prompt2prompt.display import edit_title

    out = tmp_path / "reweight"
    code = main(["edit", "a red circle and a blue square", "--reweight", "blue=0", "--model", str(sd1_folder),
                 "--steps", "2", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a red circle and a blue square"] * 2 and settings["requested_mode"] == "reweight"
    assert edit_title(settings) == "mode reweight: blue x0"
    assert "mode reweight: blue x0" in (out / "index.html").read_text()
    assert edit_title({"mode": "replace", "requested_mode": "auto", "reweight": [["red", 2.0]],
                       "prompts": ["a red circle", "a red square"]}) == "mode replace, re-weighted red x2"
    code = main(["edit", "a red circle", "--model", str(sd1_folder), "--out", str(tmp_path / "none"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "or --reweight WORD=FACTOR to re-weight the source prompt itself" in err


def test_self_max_side_reaches_the_edit(sd1_folder, tmp_path):
    out = tmp_path / "edit"
    assert main(["edit", "a red circle", "a red square", "--model", str(sd1_folder), "--steps", "2",
                 "--self-max-side", "16", "--out", str(out), "--quiet"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["self_max_side"] == 16 and settings["keep_background"] is True and settings["feather"] is None


def test_words_the_bundled_model_never_saw_are_named(shapes, sd1_folder, tmp_path, capsys):
    assert main(["attend", "a pink hexagon and a red circle", "--steps", "1", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "'hexagon', 'pink' are outside them" in err and "'red'" not in err and "'circle'" not in err
    assert main(["attend", "a red circle", "--steps", "1", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "outside them" not in capsys.readouterr().err  # the world's own words: no warning
    assert main(["attend", "a pink hexagon", "--model", str(sd1_folder), "--steps", "1", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert "outside them" not in capsys.readouterr().err  # another model's vocabulary is not the shapes world's
