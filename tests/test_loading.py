import json

import pytest

from prompt2prompt.errors import ModelError
from prompt2prompt.loading import family, load_pipeline


def test_family_of_each_kind(pipes):
    assert {k: family(p) for k, p in pipes.items()} == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


def test_load_a_saved_folder(sd1_folder, sd1):
    pipe = load_pipeline(sd1_folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == 77
    a = dict(sd1.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        assert (p == a[name]).all()


def test_load_saved_sdxl_and_sd2(pipes, tmp_path):
    for kind in ("sd2", "sdxl"):
        pipes[kind].save_pretrained(tmp_path / kind)
        assert family(load_pipeline(tmp_path / kind)) == kind


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": []}))
    with pytest.raises(ModelError, match="expected a Stable Diffusion"):
        load_pipeline(tmp_path / "other")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_pipeline("nobody/no-such-model")


def test_nonsense_name():
    with pytest.raises(ModelError, match="neither a bundled model"):
        load_pipeline("no_such_thing")


def test_tiny_pipeline_command(tmp_path, capsys):
    from prompt2prompt.testing import main

    main(["sd2", str(tmp_path / "tiny")])
    assert family(load_pipeline(tmp_path / "tiny")) == "sd2"
    assert "saved a tiny random sd2 pipeline" in capsys.readouterr().out
