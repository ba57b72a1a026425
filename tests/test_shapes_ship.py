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
    assert "Provenance" not in card


def test_the_card_ends_with_the_provenance_given(run):
    card = (ship(run, PASSING, provenance="One run on 2 cores, 2026-12-02.\n") / "README.md").read_text()
    assert card.endswith("\n## Provenance\nOne run on 2 cores, 2026-12-02.\n")


@pytest.mark.parametrize("measure", sorted(BARS["shapes"]))
def test_ship_refuses_a_model_below_any_bar(run, tmp_path, measure):
    with pytest.raises(InputError, match=measure):
        ship(run, {**PASSING, measure: BARS["shapes"][measure] - 0.01})
    assert not (tmp_path / "package").exists()  # nothing written, not even a scratch folder


SHIPPED = {"colour_accuracy": 0.996, "shape_accuracy": 0.921, "exact_count": 0.735, "exact_count_two": 0.612,
           "attention_iou": 0.577, "autoencoder_psnr": 28.4}  # v1, as BENCHMARKS.md measures it
BETTER = {**SHIPPED, "colour_accuracy": 1.0, "shape_accuracy": 0.945, "exact_count": 0.85, "exact_count_two": 0.783,
          "attention_iou": 0.627, "autoencoder_psnr": 34.38, "count": 200, "settings": {}}


def test_a_first_improvement_ships_below_the_bars_when_better_on_every_measure(run, tmp_path):
    assert ship_module.improvements(BETTER, SHIPPED) == []
    target = ship(run, BETTER, over=SHIPPED)  # below the count bars (0.95, 0.90), better than what ships
    assert (target / "model_index.json").exists()
    assert ship_module.improvements({**BETTER, "colour_accuracy": 1.0}, {**SHIPPED, "colour_accuracy": 1.0}) == []


@pytest.mark.parametrize("measure", ship_module.IMPROVED)
def test_a_first_improvement_worse_or_equal_on_one_measure_is_refused(run, tmp_path, measure):
    with pytest.raises(InputError, match=f"not better than the shipped model on every measure .*{measure}"):
        ship(run, {**BETTER, measure: SHIPPED[measure]}, over=SHIPPED)
    assert not (tmp_path / "package").exists()
    with pytest.raises(InputError, match="not measured in both"):
        ship(run, BETTER, over={k: v for k, v in SHIPPED.items() if k != measure})


def test_ship_refuses_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(InputError, match="model_index.json"):
        ship(tmp_path, PASSING)


def test_the_card_describes_the_schedule_the_run_trained_with(run):
    from prompt2prompt.shapes.ship import model_card

    config = {"steps": 10000, "prediction": "v_prediction", "zero_snr": True, "vae_edge_weight": 6.0}
    (run / "config.json").write_text(json.dumps(config))
    card = model_card(run, PASSING, run / "pipeline")
    assert "zero terminal SNR" in card and "trailing timesteps" in card and "v-prediction" in card
    assert "--prediction v_prediction --zero-snr True" in card and "edge (6)" in card
    assert "cross-attention at\n  16x16, 8x8 and the 4x4 middle" in card and "`model_max_length`\n  77" in card
    config.update(cross_attention_levels=[True, True, True], text_length=16)
    (run / "config.json").write_text(json.dumps(config))
    card = model_card(run, PASSING, run / "pipeline")
    assert "cross-attention at\n  16x16, 8x8, 4x4 and the 4x4 middle" in card and "`model_max_length`\n  16" in card
    assert "Min-SNR-5" not in card  # the zero-SNR run weights its loss differently
    (run / "config.json").write_text(json.dumps({"steps": 9200}))
    plain = model_card(run, PASSING, run / "pipeline")
    assert "epsilon prediction" in plain and "zero terminal" not in plain and "Min-SNR-5 weighting" in plain


def test_the_card_gives_the_scene_mix_the_run_trained_on(run):
    from prompt2prompt.shapes.ship import model_card

    (run / "config.json").write_text(json.dumps({"steps": 9200, "two_objects": 0.6, "three_objects": 0.15}))
    card = model_card(run, PASSING, run / "pipeline")
    assert "scenes (60% with two objects, 15% with three) with" in card
    (run / "config.json").write_text(json.dumps({"steps": 9200, "two_objects": 0.7}))
    card = model_card(run, PASSING, run / "pipeline")
    assert "scenes (70% with two objects) with" in card and "with three)" not in card
