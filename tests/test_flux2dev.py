"""Flux.2 [dev] (`Flux2Pipeline`), what is its own (the registry-parametrised tests run it as every family): a
checkpoint whose tokenizer is a PixtralProcessor loads without torchvision, the prompt's tokens are the pipeline's own
input ids, guidance is one call a step with the scale as the transformer's input, and a negative prompt is refused."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from prompt2prompt.attention import AttentionController
from prompt2prompt.cli import main
from prompt2prompt.errors import InputError, ModelError, PromptError
from prompt2prompt.families import FAMILIES, family_of
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.loading import load_pipeline
from prompt2prompt.tokens import prompt_tokens

OPTS = GenerationOptions(steps=2, seed=1, height=32, width=32, max_sequence_length=16)
NO_TORCHVISION = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                    reason="with torchvision a PixtralProcessor is built, not stood in for")


@pytest.fixture(scope="module")
def dev(joint_pipes):
    return joint_pipes["flux2dev"]


def _as_published(pipe, folder):
    """The pipeline saved as Flux.2 [dev]'s checkpoint names its tokenizer: a PixtralProcessor, whose chat template
    lies beside the tokenizer in chat_template.json (the processor's file), not in the tokenizer's own files."""
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    template = folder / "tokenizer" / "chat_template.jinja"
    (folder / "tokenizer" / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    return folder


@pytest.fixture(scope="module")
def published(dev, tmp_path_factory):
    return _as_published(dev, tmp_path_factory.mktemp("flux2dev") / "published")


def test_the_record():
    record = FAMILIES["flux2dev"]
    assert record.pipelines == ("Flux2Pipeline",) and not record.networks and not record.guidance_calls
    assert record.flowedit == FAMILIES["flux"].flowedit  # Flux.1 [dev]'s embedded-guidance settings, untuned
    assert record.guidance(3.0, None, 2) == {"guidance_scale": 3.0}


def test_a_bare_transformer_routes_as_klein(dev):
    assert family_of(dev) is FAMILIES["flux2dev"] and family_of(dev.transformer) is FAMILIES["flux2"]


@NO_TORCHVISION
def test_a_pixtral_processor_checkpoint_loads_with_its_tokenizer_and_draws_the_same_image(dev, published):
    loaded = load_pipeline(published)
    assert family_of(loaded) is FAMILIES["flux2dev"]
    assert not hasattr(loaded.tokenizer, "tokenizer") and loaded.tokenizer.chat_template  # the text tokenizer itself
    assert prompt_tokens(loaded, "a red circle", 16) == prompt_tokens(dev, "a red circle", 16)
    ours, theirs = (generate(p, ["a red circle", "a blue square"], None, OPTS, progress=False) for p in (loaded, dev))
    torch.testing.assert_close(ours.latents, theirs.latents, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours.images, theirs.images):
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1


@NO_TORCHVISION
def test_a_processor_that_cannot_stand_in_is_one_sentence(published, tmp_path):
    broken = tmp_path / "no-template"
    shutil.copytree(published, broken)
    (broken / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(ModelError, match=r"PixtralProcessor, which transformers cannot build without torchvision "
                                         r"\(not installed\), and its text tokenizer .* has no chat template"):
        load_pipeline(broken)
    index = json.loads((published / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralImageProcessorFast"]  # not a processor: nothing stands in for it
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="PixtralImageProcessorFast, which transformers cannot build without "
                                         "torchvision .*: install it"):
        load_pipeline(broken)


def test_the_prompts_positions_are_the_pipelines_own_input_ids(dev):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    for prompt, length in (("a red circle", 16), ("a big red circle and a blue square next to a green cross", 12)):
        tokens = prompt_tokens(dev, prompt, length)
        ids = dev.tokenizer.apply_chat_template(
            format_input([prompt], dev.system_message), add_generation_prompt=False, tokenize=True, return_dict=True,
            padding="max_length", truncation=True, max_length=length)["input_ids"][0]
        assert len(ids) == tokens.length == length and tuple(ids[: len(tokens.ids)]) == tokens.ids
        pieces = dev.tokenizer.convert_ids_to_tokens(ids)
        for word in tokens.words:
            assert [pieces[p] for p in word.tokens] == ["Ġ" * (word.start > 0) + word.text]
    tokens = prompt_tokens(dev, "a red circle", 16)
    assert tokens.head == 5 and tokens.positions("circle") == (7,)  # <s> [SYSTEM_PROMPT] message [/SYSTEM_PROMPT]
    # [INST] (the tiny tokenizer's system message is one token)
    assert tokens.truncated == "" and prompt_tokens(dev, "a big red circle and a blue square next to a green cross",
                                                    12).truncated


def test_a_tokenizer_that_adds_its_bos_reads_the_chat_as_the_pipeline_does(dev):
    """A Mistral tokenizer prepends <s> when it adds special tokens; `apply_chat_template` adds none (the chat holds
    its <s>): the positions follow the pipeline's ids, not a second <s>."""
    from diffusers import Flux2Pipeline
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=dev.tokenizer.backend_tokenizer.__class__.from_str(
        dev.tokenizer.backend_tokenizer.to_str()), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>")
    tokenizer.chat_template = dev.tokenizer.chat_template
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos  # it adds one
    pipe = Flux2Pipeline(**{**dev.components, "tokenizer": tokenizer})
    assert prompt_tokens(pipe, "a red circle", 16) == prompt_tokens(dev, "a red circle", 16)


class _Probe(AttentionController):
    def __init__(self):
        self.rows = []

    def wants(self, site):
        return site.layer.is_cross

    def attention(self, probs, site):
        self.rows.append(probs.shape[0])


def test_guidance_is_one_call_a_step_with_the_scale_as_its_input(dev):
    seen = []
    hook = dev.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist())),
        with_kwargs=True)
    try:
        probe = _Probe()
        generate(dev, ["a red circle", "a blue square"], probe, GenerationOptions(steps=2, guidance=2.5, height=32,
                                                                                  width=32, max_sequence_length=16),
                 progress=False)
    finally:
        hook.remove()
    assert seen == [(2, [2.5, 2.5])] * 2  # one call a step, the prompts' rows, the scale embedded
    assert set(probe.rows) == {2} and len(probe.rows) == len(dev.transformer.attn_processors) * 2


def test_a_negative_prompt_is_refused_in_one_sentence(dev):
    with pytest.raises(InputError) as caught:
        generate(dev, ["a red circle"], None, GenerationOptions(steps=1, height=32, width=32,
                                                                negative_prompt="blurry"), progress=False)
    message = str(caught.value)
    assert message.startswith("Flux.2 [dev] takes no negative prompt") and "\n" not in message
    assert message.count(". ") == 0 and message.endswith("'blurry'")


def test_the_cli_refuses_a_control_token_in_the_prompt_in_one_sentence(dev, tmp_path, capsys):
    """The CLI takes no negative prompt; what it refuses on this family before any work is a prompt holding one of
    Mistral's bracketed control tokens, which the tokenizer would read as that token."""
    dev.save_pretrained(tmp_path / "saved")
    capsys.readouterr()  # saving's progress bar
    out = tmp_path / "never"
    code = main(["attend", "a red [INST] circle", "--model", str(tmp_path / "saved"), "--steps", "1", "--height", "32",
                 "--width", "32", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "'[INST]'" in err and "control token" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(PromptError, match=r"'\[IMG\]'"):  # the pipeline would drop it from the prompt silently
        prompt_tokens(dev, "an [IMG] here")
