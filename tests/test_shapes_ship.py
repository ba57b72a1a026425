"""Shipping a trained pipeline: only past the bars, nothing half-written, a model card with the measured table."""

import json
import shutil

import pytest

from prompt2prompt.errors import InputError
from prompt2prompt.shapes import ship as ship_module
from prompt2prompt.shapes.ship import BARS, ship

PASSING = {"colour_accuracy": 0.995, "shape_accuracy": 0.95, "exact_count": 0.96, "exact_count_two": 0.93,
           "both_present": 0.9, "attention_iou": 0.65, "autoencoder_psnr": 33.0, "count": 200,
           "settings": {"steps": 50, "guidance": 7.5}, "per_caption": [{"caption": "a red circle"}]}


@pytest.fixture
def run(sd1_folder, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(sd1_folder, folder / "pipeline")
    (folder / "config.json").write_text(json.dumps({"steps": 12000, "grounding_weight": 0.05}))
    monkeypatch.setitem(ship_module.BUNDLED, "shapes", tmp_path / "package" / "shapes")
    return folder


def test_ship_copies_the_pipeline_and_writes_the_card(run, tmp_path):
    target = ship(run, PASSING)
    assert target == tmp_path / "package" / "shapes"
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(target, local_files_only=True)  # a complete pipeline folder
    card = (target / "README.md").read_text()
    assert "| shape accuracy | 0.950 | 0.93 |" in card and "--steps 12000" in card
    assert "| two colour regions (two-object captions) | 0.900 | |" in card  # reported, no bar
    saved = json.loads((target / "eval.json").read_text())
    assert saved["attention_iou"] == 0.65 and "per_caption" not in saved


@pytest.mark.parametrize("measure", sorted(BARS["shapes"]))
def test_ship_refuses_a_model_below_any_bar(run, tmp_path, measure):
    with pytest.raises(InputError, match=measure):
        ship(run, {**PASSING, measure: BARS["shapes"][measure] - 0.01})
    assert not (tmp_path / "package").exists()  # nothing written, not even a scratch folder


def test_ship_refuses_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(InputError, match="model_index.json"):
        ship(tmp_path, PASSING)
