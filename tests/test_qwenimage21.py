"""Qwen-Image 2.1 (`QwenImage21Pipeline`), what is its own (the registry-parametrised tests run it as every family:
routing equal to stock, the oracle of its blocks, replacement, local blend, the command line, inversion and FlowEdit):
its checkpoint's Qwen3VLProcessor loads without torchvision as its text half, the prompt's tokens are the
transformer's own text, the steps that read the cached text keys give the maps and edits of the steps that compute
them, refinement and re-weighting, its RGBA pictures come back over white, and condition images are refused."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import InputError
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.loading import load_pipeline
from prompt2prompt.standins import TextProcessor
from prompt2prompt.store import AttentionStore
from prompt2prompt.testing import KINDS
from prompt2prompt.tokens import prompt_tokens

pytestmark = pytest.mark.skipif("qwenimage21" not in KINDS, reason="this diffusers has no QwenImage21Pipeline")
OPTS = GenerationOptions(steps=3, seed=1, height=128, width=128, guidance=4.0)  # 8x8 image tokens of 16 px
NO_TORCHVISION = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                    reason="with torchvision the Qwen3VLProcessor itself is built")


@pytest.fixture(scope="module")
def pipe(joint_pipes):
    return joint_pipes["qwenimage21"]


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwenimage21") / "saved"
    pipe.save_pretrained(folder)
    return folder


def _text_calls(pipe, prompts, **kwargs) -> list:
    """The transformer's encoder_hidden_states of each call of a stock run of the prompts."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        pipe(prompt=list(prompts), num_inference_steps=1, height=64, width=64, output_type="latent", **kwargs)
    finally:
        hook.remove()
    return seen


def test_the_prompts_tokens_are_the_transformers_own_text(pipe):
    """The tokens a word is found at are the ones the transformer reads: the chat template's ids with the system turn
    dropped (`_drop_idx` of them), as many as the transformer's text has rows, the prompt's words one token each."""
    prompt = "a red circle and a blue square"
    tokens = prompt_tokens(pipe, prompt)
    rendered = pipe.prompt_template_t2i.format(prompt)
    ids = pipe.processor.tokenizer(rendered)["input_ids"][pipe._drop_idx:]
    assert list(tokens.ids) == ids and tokens.length == len(ids)
    (text,) = _text_calls(pipe, [prompt])
    assert text.shape[1] == tokens.length
    assert tokens.positions("circle") == (5,) and tokens.positions("square") == (9,)  # <|im_start|> user \n a red ...


@NO_TORCHVISION
def test_the_checkpoint_names_its_processor_and_loads_its_text_half(saved, tmp_path):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert (saved / "processor" / "preprocessor_config.json").is_file()
    loaded = load_pipeline(saved)
    assert isinstance(loaded.processor, TextProcessor) and "torchvision" in loaded.processor.reason.lower()
    assert loaded.config.processor == ("transformers", "Qwen3VLProcessor")
    loaded.save_pretrained(tmp_path / "again")  # saved again as the checkpoint it was read from
    again = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert again["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert (tmp_path / "again" / "processor" / "preprocessor_config.json").is_file()
    loaded.set_progress_bar_config(disable=True)
    with pytest.raises(InputError, match=r"Qwen3VLProcessor, which transformers cannot build here \(.*[Tt]orchvision"
                                         r".*images cannot be read as inputs here"):
        loaded(prompt="a red circle", image=[np.zeros((64, 64, 3), np.uint8)], num_inference_steps=1, height=64,
               width=64)


def test_cached_steps_give_the_maps_and_edits_of_computed_steps(pipe):
    """After the first step the pipeline gives the attention the image's queries alone, the text's keys and values
    from its cache; with the cache off every step computes them. The maps and an edit's latents are the same."""
    prompts = ["a red circle and a blue square", "a red square and a blue square"]
    stores = {cached: AttentionStore() for cached in (True, False)}
    runs = {cached: generate(pipe, prompts[:1], stores[cached], OPTS, progress=False, use_kv_cache=cached)
            for cached in (True, False)}
    torch.testing.assert_close(runs[True].latents, runs[False].latents, atol=1e-5, rtol=1e-5)
    assert stores[True].sums.keys() == stores[False].sums.keys() and len(stores[True].sums) > 0
    for name in stores[True].sums:  # every layer's blocks, summed over the steps
        torch.testing.assert_close(stores[True].mean(name), stores[False].mean(name), atol=1e-5, rtol=1e-4)
    edits = {cached: edit(pipe, prompts[0], prompts[1], EditOptions(), OPTS, progress=False, use_kv_cache=cached)
             for cached in (True, False)}
    torch.testing.assert_close(edits[True].controlled.latents, edits[False].controlled.latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(edits[True].controlled.latents[1], edits[True].controlled.latents[0], atol=1e-4)


def test_refine_and_reweight_change_the_target_and_keep_the_source(pipe):
    """The source row is the stock run's of the same batch (the batch's texts are padded to the longest, which moves
    the image's rotary positions: a prompt drawn alone is not the reference)."""
    refined = edit(pipe, "a red circle", "a big red circle", EditOptions(mode="refine"), OPTS, progress=False)
    reweighted = edit(pipe, "a red circle", "a red circle", EditOptions(mode="reweight", reweight=(("red", 4.0),)),
                      OPTS, progress=False)
    for result in (refined, reweighted):
        stock = generate(pipe, [p.prompt for p in result.prompts], None, OPTS, progress=False)
        torch.testing.assert_close(result.controlled.latents[0], stock.latents[0], atol=1e-5, rtol=1e-5)
        assert (result.controlled.latents[1] - result.controlled.latents[0]).abs().max() > 1e-3
    assert refined.settings["mode"] == "refine" and reweighted.settings["requested_mode"] == "reweight"


def test_the_rgba_picture_comes_back_over_white(pipe):
    """The autoencoder draws four channels; the picture handed back is its colour composited over white by its
    alpha, as the pipeline's own RGBA output composited."""
    from PIL import Image

    ours = generate(pipe, ["a red circle"], None, OPTS, progress=False)
    own = pipe(prompt=["a red circle"], num_inference_steps=OPTS.steps, height=128, width=128, output_type="pil",
               latents=ours.initial, true_cfg_scale=4.0, negative_prompt=[" "]).images[0]
    assert own.mode == "RGBA" and ours.images[0].mode == "RGB"
    white = Image.alpha_composite(Image.new("RGBA", own.size, (255, 255, 255, 255)), own).convert("RGB")
    assert np.array_equal(np.asarray(white), np.asarray(ours.images[0]))


def test_steps_are_honoured_and_the_checkpoints_own_noise_levels_used_at_their_count(pipe):
    """diffusers' pipeline samples on its config's `sample_sigmas` whatever num_inference_steps says; here a checkpoint
    that sets them is sampled on them at their count of steps, on the default grid (1 to 1/N) at any other count, and
    the inversion's grid is the same (`latents.timesteps`)."""
    from prompt2prompt.families import family_of

    own = [1.0, 0.7, 0.3]
    pipe.register_to_config(sample_sigmas=own)
    try:
        for steps, expected in ((3, own), (4, [1.0, 0.75, 0.5, 0.25])):
            generate(pipe, ["a red circle"], None, GenerationOptions(steps=steps, seed=0, height=64, width=64),
                     progress=False)
            sampled = pipe.scheduler.timesteps.clone()
            grid = family_of(pipe).latents.timesteps(pipe, pipe.scheduler.config, steps, (1, 4, 4, 4))
            assert grid["sigmas"] == expected
            pipe.scheduler.set_timesteps(sigmas=grid["sigmas"], mu=grid["mu"])
            assert len(sampled) == steps and torch.equal(sampled, pipe.scheduler.timesteps)
    finally:
        pipe.register_to_config(sample_sigmas=None)


def test_a_diffusers_without_the_pipeline_is_named_in_one_sentence(saved, monkeypatch):
    """Qwen-Image 2.1 needs diffusers 0.42 (the floor is 0.40): its folder under an older diffusers is refused by
    name, not with a traceback from inside `from_pretrained`."""
    from prompt2prompt.errors import ModelError
    from prompt2prompt.families import FAMILIES

    monkeypatch.setattr(type(FAMILIES["qwenimage21"]), "installed", property(lambda self: False))
    with pytest.raises(ModelError, match=r"holds a QwenImage21Pipeline \(Qwen-Image 2.1\), which this diffusers "
                                         r"\([\d.]+\w*\) does not have: install a diffusers that does"):
        load_pipeline(saved)
