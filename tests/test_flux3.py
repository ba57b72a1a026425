"""Flux.3 (`Flux3ModularPipeline`, a Modular Diffusers pipeline), what is its own (the registry-parametrised tests run
it as every family: routing equal to stock, the oracle of its blocks, replacement, local blend, the command line,
inversion and FlowEdit): its blocks are driven with the steps counted and everything put back, one prompt reproduces
the pipeline's own call, the prompts' tokens and embeddings are its text step's, the saved folder loads (its
Qwen3VLProcessor as its text half) wherever it is moved, refinement and re-weighting, the distilled model, and what
is refused."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from prompt2prompt.attention import AttentionController
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import InputError, ModelError, P2PError
from prompt2prompt.generation import GenerationOptions, generate, initial_latent
from prompt2prompt.loading import load_pipeline
from prompt2prompt.standins import TextProcessor
from prompt2prompt.store import AttentionStore
from prompt2prompt.testing import KINDS
from prompt2prompt.tokens import batch_tokens, prompt_tokens
from prompt2prompt.trace import trace

pytestmark = pytest.mark.skipif("flux3" not in KINDS, reason="this diffusers has no Flux3ModularPipeline")
OPTS = GenerationOptions(steps=3, seed=1, height=32, width=32, guidance=4.0)  # 8x8 image tokens
NO_TORCHVISION = pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                                    reason="with torchvision the Qwen3VLProcessor itself is built")


@pytest.fixture(scope="module")
def pipe(joint_pipes):
    return joint_pipes["flux3"]


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux3") / "saved"
    pipe.save_pretrained(str(folder))
    return folder


def _stock(pipe, prompt, latent, options, **kwargs):
    """The pipeline's own call (its blocks as built: the tiny one has no prompt upsampler), its latents."""
    return pipe(prompt=prompt, latents=latent, num_inference_steps=options.steps, height=options.height,
                width=options.width, output="latents", **kwargs)


class Steps(AttentionController):
    def __init__(self):
        self.ends = []

    def step_end(self, step, timestep, latents):
        self.ends.append((step, latents.shape))
        return None


def test_one_prompt_is_the_pipelines_own_call_and_everything_is_put_back(pipe):
    """Uncontrolled and controlled (recording) generation of one prompt give the latents of the modular pipeline's
    own call; the steps are counted by the loop's step end; the pipeline's blocks, guider and processors are left as
    they were."""
    blocks, guider = pipe._blocks, pipe.guider
    scale, enabled = guider.guidance_scale, guider._enabled
    processors = dict(pipe.transformer.attn_processors)
    latent = initial_latent(pipe, OPTS)
    pipe.guider.guidance_scale = OPTS.guidance
    try:
        stock = _stock(pipe, "a red circle", latent, OPTS)
    finally:
        pipe.guider.guidance_scale = scale
    plain = generate(pipe, ["a red circle"], None, OPTS, progress=False)
    steps = Steps()
    recorded = generate(pipe, ["a red circle"], steps, OPTS, progress=False)
    # the loop's latents are tokens; the pipeline's output unpacks them to (1, channels, rows, columns)
    tokens = stock.flatten(2).transpose(1, 2)
    torch.testing.assert_close(plain.latents, tokens, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(recorded.latents, tokens, atol=1e-5, rtol=1e-5)
    assert [s for s, _ in steps.ends] == list(range(OPTS.steps)) and steps.ends[0][1] == tokens.shape
    assert pipe._blocks is blocks and pipe.guider is guider
    assert (guider.guidance_scale, guider._enabled) == (scale, enabled)
    assert dict(pipe.transformer.attn_processors) == processors
    assert "_progress_bar_config" not in vars(pipe)


def test_the_latents_a_step_end_returns_are_the_next_steps_input(pipe):
    """What the controller's step end returns (a local blend's latents, a direct inversion's path) is what the loop
    goes on from: here zeros after the first step, read at the transformer's next call."""

    class Zeroing(AttentionController):
        def step_end(self, step, timestep, latents):
            return torch.zeros_like(latents) if step == 0 else None

    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].clone()),
                                                      with_kwargs=True)
    try:
        generate(pipe, ["a red circle"], Zeroing(), OPTS, progress=False)
    finally:
        hook.remove()
    assert len(seen) == 2 * OPTS.steps  # guided: the conditional and the unconditional call of each step
    assert seen[0].abs().sum() > 0 and not seen[2].any() and not seen[3].any()


def test_no_guidance_is_one_call_a_step_and_the_pipelines_own(pipe):
    latent = initial_latent(pipe, OPTS)
    calls = []
    before = pipe.guider.guidance_scale, pipe.guider._enabled
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        ours = generate(pipe, ["a red circle"], None, GenerationOptions(steps=3, seed=1, height=32, width=32,
                                                                        guidance=1.0), progress=False)
    finally:
        hook.remove()
    assert len(calls) == 3
    assert (pipe.guider.guidance_scale, pipe.guider._enabled) == before  # the guider put back as it was
    enabled = pipe.guider._enabled
    pipe.guider.disable()
    try:
        stock = _stock(pipe, "a red circle", latent, OPTS)
    finally:
        pipe.guider._enabled = enabled
    torch.testing.assert_close(ours.latents, stock.flatten(2).transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_the_tokens_and_embeddings_are_the_text_steps(pipe):
    """A prompt's tokens are the chat text the text step reads, its window the step's (a multiple of 80 tokens); the
    embeddings of a batch are each prompt's own encoding by the step, at the batch's window."""
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep

    from prompt2prompt.families.flux3 import encode

    prompt = "a red circle and a blue square"
    tokens = prompt_tokens(pipe, prompt)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True)
    text = text if isinstance(text, str) else text[0]
    assert list(tokens.ids) == pipe.tokenizer.tokenizer(text)["input_ids"] and tokens.length == 80
    assert tokens.positions("circle") == (5,) and tokens.positions("square") == (9,)  # <|im_start|> user \n a red
    own = pipe(prompt=prompt, num_inference_steps=1, height=32, width=32, output="prompt_embeds")  # its own text step
    assert own.shape[1] == tokens.length
    torch.testing.assert_close(encode(pipe, [prompt], None), own, atol=0, rtol=0)
    long = " ".join(["a red circle and a blue square"] * 12)  # beyond 80 tokens: a window of 160
    shared = batch_tokens(pipe, [prompt, long])
    assert [t.length for t in shared] == [160, 160]
    both = encode(pipe, [prompt, long], 160)
    alone = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompt,
                                                             max_sequence_length=160, pad_multiple=160)
    torch.testing.assert_close(both[:1], alone, atol=0, rtol=0)
    torch.testing.assert_close(both[:1, :80], own, atol=1e-6, rtol=0)  # the real tokens' rows: the same


@NO_TORCHVISION
def test_the_saved_folder_names_its_processor_and_loads_where_it_is_moved(pipe, saved, tmp_path):
    index = json.loads((saved / "modular_model_index.json").read_text())
    assert index["_class_name"] == "Flux3ModularPipeline"
    assert index["tokenizer"][:2] == ["transformers", "Qwen3VLProcessor"]
    moved = tmp_path / "moved"
    shutil.copytree(saved, moved)
    shutil.rmtree(saved.parent / "saved-gone", ignore_errors=True)
    loaded = load_pipeline(moved)  # the index records the folder it was saved to: read from where it is now
    assert type(loaded).__name__ == "Flux3ModularPipeline"
    assert isinstance(loaded.tokenizer, TextProcessor) and "torchvision" in loaded.tokenizer.reason.lower()
    for name in ("transformer", "text_encoder", "vae"):
        assert str(moved) in str(getattr(loaded, name)._diffusers_load_id)
    ours = generate(loaded, ["a red circle"], AttentionStore(), OPTS, progress=False)
    theirs = generate(pipe, ["a red circle"], AttentionStore(), OPTS, progress=False)
    torch.testing.assert_close(ours.latents, theirs.latents, atol=1e-5, rtol=1e-5)
    loaded.save_pretrained(str(tmp_path / "again"), overwrite_modular_index=True)  # as the checkpoint it was read
    again = json.loads((tmp_path / "again" / "modular_model_index.json").read_text())
    assert again["tokenizer"][:2] == ["transformers", "Qwen3VLProcessor"]
    assert (tmp_path / "again" / "tokenizer" / "preprocessor_config.json").is_file()


@NO_TORCHVISION
def test_an_autoprocessor_entry_is_read_as_the_processor_class_its_folder_names(saved, tmp_path):
    folder = tmp_path / "auto"
    shutil.copytree(saved, folder)
    index = json.loads((folder / "modular_model_index.json").read_text())
    index["tokenizer"] = ["transformers", "AutoProcessor", index["tokenizer"][2]]
    (folder / "modular_model_index.json").write_text(json.dumps(index))
    (folder / "tokenizer" / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    loaded = load_pipeline(folder)
    assert isinstance(loaded.tokenizer, TextProcessor) and "Qwen3VLProcessor" in loaded.tokenizer.reason


def test_offload_and_a_folder_without_an_index_are_refused(saved, tmp_path):
    with pytest.raises(ModelError, match="modular pipeline.*ComponentsManager"):
        load_pipeline(saved, device="cuda", offload="model")  # refused before anything is loaded or moved
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="modular_model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_refine_and_reweight_change_the_target_and_keep_the_source(pipe):
    """The source row is the prompt drawn alone (both prompts' windows are 80 tokens); the target row moves."""
    source = generate(pipe, ["a red circle"], None, OPTS, progress=False)
    refined = edit(pipe, "a red circle", "a big red circle", EditOptions(mode="refine"), OPTS, progress=False)
    reweighted = edit(pipe, "a red circle", "a red circle", EditOptions(mode="reweight", reweight=(("red", 4.0),)),
                      OPTS, progress=False)
    for result in (refined, reweighted):
        torch.testing.assert_close(result.controlled.latents[:1], source.latents, atol=1e-5, rtol=1e-5)
        assert (result.controlled.latents[1] - result.controlled.latents[0]).abs().max() > 1e-3
    assert refined.settings["mode"] == "refine" and reweighted.settings["requested_mode"] == "reweight"


def test_trace_and_reference_images_are_refused_by_name(pipe):
    from prompt2prompt.families import FAMILIES

    with pytest.raises(P2PError, match="modular pipeline: p2p.attend and p2p.edit"):
        with trace(pipe):
            pass
    x = torch.zeros(1, 4, 16)
    with pytest.raises(P2PError, match="reference images"):
        FAMILIES["flux3"].inputs((), {"hidden_states": x, "encoder_hidden_states": torch.zeros(1, 3, 8),
                                      "image_cond_hidden_states": x}, 1)


@pytest.fixture(scope="module")
def distilled(pipe):
    """The step-distilled model's pipeline: Flux3DistilledAutoBlocks (no prompt upsampler), a flow-map transformer,
    no guider."""
    from diffusers import Flux3Transformer2DModel
    from diffusers.modular_pipelines.flux3 import Flux3DistilledAutoBlocks

    blocks = Flux3DistilledAutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    made = blocks.init_pipeline()
    torch.manual_seed(0)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    made.update_components(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=pipe.vae,
                           transformer=Flux3Transformer2DModel(**{**config, "flow_map": True}).eval(),
                           scheduler=pipe.scheduler)
    return made


def test_the_distilled_model_is_driven_unguided_and_its_real_images_refused(distilled):
    from prompt2prompt.families import family_of
    from prompt2prompt.inversion import InversionOptions, invert

    assert family_of(distilled).name == "flux3"
    options = GenerationOptions(steps=3, seed=1, height=32, width=32)
    assert options.resolved(distilled).guidance == 1.0  # no guider: its own default
    latent = initial_latent(distilled, options)
    stock = _stock(distilled, "a red circle", latent, options)
    steps = Steps()
    ours = generate(distilled, ["a red circle"], steps, options, progress=False)
    torch.testing.assert_close(ours.latents, stock.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert len(steps.ends) == 3
    swapped = edit(distilled, "a red circle", "a blue circle", EditOptions(blend=("circle", "circle")), options,
                   progress=False)
    assert len(swapped.controlled.images) == 2
    with pytest.raises(InputError, match="no guider"):
        generate(distilled, ["a red circle"], None, GenerationOptions(steps=2, height=32, width=32, guidance=4.0),
                 progress=False)
    with pytest.raises(ModelError, match="distilled Flux.3"):
        invert(distilled, ours.images[0], "a red circle", InversionOptions(steps=2, height=32, width=32),
               progress=False)
