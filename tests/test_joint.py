"""MM-DiT models (SD3 with its T5 part and an SD3.5 dual-attention block, Flux.1 with double- and single-stream blocks,
Flux.2 klein with a chat-templated Qwen3 text, parallel single-stream attention and guidance as two calls a step):
loading, joint-attention routing equal to the stock processors, maps that are exact blocks of the joint softmax,
edits, and the command line on saved folders."""

import json
from dataclasses import replace

import pytest
import torch

from prompt2prompt import testing
from prompt2prompt.attention import AttentionController, Controllers
from prompt2prompt.cli import main
from prompt2prompt.edits import EditOptions, edit, edit_controller, edit_controllers
from prompt2prompt.errors import PromptError
from prompt2prompt.families import FAMILIES
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.loading import family, load_pipeline
from prompt2prompt.store import AttentionStore
from prompt2prompt.tokens import prompt_tokens

OPTS = GenerationOptions(steps=3, seed=1, height=32, width=32, max_sequence_length=24)
KINDS = [k for k in testing.KINDS if FAMILIES[k].joint]  # every MM-DiT tiny pipeline


def sized(kind: str, opts: GenerationOptions = OPTS) -> GenerationOptions:
    """The options at the size that gives the kind's tiny pipeline 8x8 image tokens (32 px; Qwen-Image 2.1: 128)."""
    side = FAMILIES[kind].tiny_side
    return replace(opts, height=side, width=side)


@pytest.fixture(scope="module")
def joint(joint_pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    for kind in KINDS:
        joint_pipes[kind].save_pretrained(str(root / f"{kind}-saved"))  # str: a modular pipeline takes no Path
    return {kind: (joint_pipes[kind], root / f"{kind}-saved") for kind in KINDS}


class Everything(AttentionController):
    def wants(self, site):
        return True


class Probe(AttentionController):
    def __init__(self, cross: bool | None = None):
        self.cross, self.seen = cross, []

    def wants(self, site):
        return self.cross is None or site.layer.is_cross == self.cross

    def attention(self, probs, site):
        self.seen.append((site, probs.clone()))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folders_load_and_generate_as_stock(joint, kind):
    pipe, folder = joint[kind]
    loaded = load_pipeline(folder)
    assert family(loaded) == kind and type(loaded).__name__ == type(pipe).__name__
    prompts = ["a red circle and a blue square", "a green cross"]
    stock = generate(loaded, prompts, None, OPTS, progress=False)
    recorded = generate(loaded, prompts, AttentionStore(), OPTS, progress=False)
    explicit = generate(loaded, prompts, Everything(), OPTS, progress=False)
    torch.testing.assert_close(recorded.latents, stock.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.latents, stock.latents, atol=1e-5, rtol=1e-5)


def _processors(net) -> dict:
    """Every attention module's processor, by module name (also for a network without `attn_processors`)."""
    return {name: module.processor for name, module in net.named_modules() if hasattr(module, "set_processor")}


@pytest.mark.parametrize("kind", KINDS)
def test_every_attention_module_is_routed_and_restored(joint, kind):
    pipe, _ = joint[kind]
    originals = _processors(pipe.transformer)
    probe = Probe()
    generate(pipe, ["a red circle"], probe, OPTS, progress=False)
    names = {site.layer.name.rsplit(":", 1)[0].removesuffix(".processor") for site, _ in probe.seen}
    # Z-Image's caption refiner and Flux.3's text and reference-image mode blocks have no image query: left on their
    # stock processors, never called through the router
    assert names == {n for n in originals if not n.startswith(("context_refiner", "txt_mode_blocks",
                                                                   "mode_blocks.image_cond"))}
    places = {site.layer.place for site, _ in probe.seen}
    assert places == {"sd3": {"joint", "image"}, "qwenimage": {"joint"}, "qwenimage21": {"single"},
                      "zimage": {"joint", "image"}, "flux3": {"single", "image"}}.get(kind, {"joint", "single"})
    assert _processors(pipe.transformer) == originals  # the very same processor objects, restored


@pytest.mark.parametrize("kind", KINDS)
def test_text_block_is_the_joint_softmax_block(joint, kind):
    """The image-to-text block read over the text keys alone equals the text columns of the rows read over every key,
    and each image query's text mass plus its image mass is 1: a word's map summed with the other tokens' is the
    query's total attention on the text."""
    pipe, _ = joint[kind]
    fast, full = Probe(cross=True), Probe()
    prompts = ["a red circle and a blue square"]
    generate(pipe, prompts, fast, OPTS, progress=False)
    generate(pipe, prompts, full, OPTS, progress=False)
    texts = [(s, p) for s, p in full.seen if s.layer.is_cross]
    images = {(s.layer.name.rsplit(":", 1)[0], s.step): p for s, p in full.seen if not s.layer.is_cross}
    assert len(texts) == len(fast.seen) > 0
    for (site, block), (_, exact) in zip(fast.seen, texts):
        torch.testing.assert_close(block, exact, atol=1e-5, rtol=1e-4)
        image_block = images[(site.layer.name.rsplit(":", 1)[0], site.step)]
        total = block.sum(-1) + image_block.sum(-1)  # (prompts, heads, image queries)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        assert (block.sum(-1) < 1 - 1e-3).all()  # a real part of the attention stays on the image


def test_words_are_found_in_each_encoders_part(joint):
    pipe, _ = joint["sd3"]
    tokens = prompt_tokens(pipe, "a red circle and a blue square", 24)
    assert [name for name, _, _ in tokens.parts] == ["clip", "t5"] and tokens.length == 77 + 24
    clip, t5 = tokens.positions("circle", part="clip"), tokens.positions("circle", part="t5")
    assert clip == (3,) and t5 == (77 + 2,)  # CLIP: <start> a red circle; T5: ▁a ▁red ▁circle (no start token)
    assert tokens.positions("circle") == clip + t5
    assert tokens.parts[1][2].tokens[:3] == ("a", "red", "circle")
    flux, _ = joint["flux"]
    assert prompt_tokens(flux, "a red circle", 24).positions("circle") == (2,)


def test_flux2_words_sit_inside_the_chat_template_and_edits_keep_it_aligned(joint):
    """Flux.2 klein's text is the chat-templated prompt: the words are found after the template's opening, and the
    edits' alignments map the template's tokens before and after the prompt onto themselves."""
    from prompt2prompt.alignment import refine_alignment, replace_mapper

    pipe, _ = joint["flux2"]
    source = prompt_tokens(pipe, "a red circle", 24)
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    ids = pipe.tokenizer(text)["input_ids"]
    assert source.ids == tuple(ids) and source.length == 24
    assert source.head == 3 and source.tokens[:3] == ("<|im_start|>", "user", "Ċ")  # the opening "<|im_start|>user\n"
    assert source.positions("circle") == (5,) and source.end == 6 and source.tokens[6] == "<end>"  # <|im_end|>
    assert source.real_positions() == [3, 4, 5, 6] and source.real_positions(start=True) == list(range(7))  # maps
    target = prompt_tokens(pipe, "a red square", 24)
    mapper = replace_mapper(source, target)
    assert all(mapper[i, i] == 1 for i in range(24)) and mapper.sum() == 24  # same token counts: the identity
    longer = prompt_tokens(pipe, "a big red circle", 24)
    alignment = refine_alignment(source, longer)
    pairs = dict((t, s) for s, t in alignment.pairs())
    assert [pairs[t] for t in range(3)] == [0, 1, 2]  # the opening
    assert pairs[3] == 3 and 4 not in pairs and pairs[5] == 4 and pairs[6] == 5  # a (big) red circle
    assert all(pairs[longer.end + k] == source.end + k for k in range(24 - longer.end - 1))  # closing and padding
    with pytest.raises(PromptError, match="not a word of the prompt"):
        source.positions("user")  # the template's words are not the prompt's


def test_qwenimage_words_follow_the_dropped_template_opening_and_batches_share_a_length(joint):
    """Qwen-Image drops its template's first 34 tokens: the prompt's words come first, then the template's closing;
    a call's texts are padded to the longest, so the prompts of one generation share its length."""
    from prompt2prompt.tokens import batch_tokens

    pipe, _ = joint["qwenimage"]
    short = prompt_tokens(pipe, "a red circle")
    assert short.head == 0 and short.positions("circle") == (2,) and short.tokens[3] == "<end>"  # <|im_end|>
    assert short.length == 3 + 5  # the words and "<|im_end|>\n<|im_start|>assistant\n"
    embeds, mask = pipe.encode_prompt(["a red circle"], device="cpu")
    assert embeds.shape[1] == short.length and mask is None
    longer = batch_tokens(pipe, ["a red circle", "a big red circle and a blue square"])
    assert [t.length for t in longer] == [13, 13]


def test_qwenimage_padded_text_gets_no_attention_and_edits_keep_the_source(joint):
    """Prompts of different lengths: the shorter one's padded text keys are masked; its blocks are 0 there, the
    rows over every key (a plain masked softmax here) agree with the text block, and a refinement leaves the source
    image as it was."""
    pipe, _ = joint["qwenimage"]
    prompts = ["a red circle", "a big red circle and a blue square"]
    fast, full = Probe(cross=True), Probe()
    generate(pipe, prompts, fast, OPTS, progress=False)
    generate(pipe, prompts, full, OPTS, progress=False)
    texts = [p for s, p in full.seen if s.layer.is_cross]
    images = [p for s, p in full.seen if not s.layer.is_cross]
    assert len(texts) == len(fast.seen) > 0
    for (_, block), exact, image in zip(fast.seen, texts, images):
        assert block.shape[-1] == 13 and (block[0, ..., 8:] == 0).all() and (block[0, ..., :8] > 0).all()
        torch.testing.assert_close(block, exact, atol=1e-5, rtol=1e-4)
        total = block.sum(-1) + image.sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    r = edit(pipe, prompts[0], prompts[1], EditOptions(mode="refine", cross_steps=1.0, self_steps=0.0), OPTS,
             vanilla=True, progress=False)
    torch.testing.assert_close(r.controlled.latents[0], r.vanilla.latents[0], atol=1e-5, rtol=1e-5)
    assert (r.controlled.latents[1] - r.vanilla.latents[1]).abs().max() > 1e-3


def test_zimage_controller_sees_the_conditional_rows_which_come_first(joint):
    """Z-Image guides in one call whose batch holds the conditional rows first: the block the controller sees at the
    first step is the one the same prompt gives without guidance (one row, nothing unconditional), and its caption
    positions are the template's, after the image tokens and their padding to a multiple of 32."""
    pipe, _ = joint["zimage"]
    guided, alone = Probe(cross=True), Probe(cross=True)
    generate(pipe, ["a red circle"], guided, OPTS, progress=False)
    generate(pipe, ["a red circle"], alone, GenerationOptions(steps=3, seed=1, height=32, width=32, guidance=1.0),
             progress=False)
    first = [(s, p) for s, p in guided.seen if s.step == 0]
    assert first and len(first) == len([s for s, _ in alone.seen if s.step == 0])
    for (_, block), (_, same) in zip(first, alone.seen):
        assert block.shape == same.shape == (1, 2, 64, 32)  # 8x8 image queries, the caption padded to 32
        torch.testing.assert_close(block, same, atol=1e-6, rtol=1e-5)
    tokens = prompt_tokens(pipe, "a red circle")
    assert tokens.length == 32 and tokens.positions("circle") == (5,)  # <|im_start|> user \n a red circle
    # a negative prompt longer than the prompts (its caption padded to 64): the prompts' text stays theirs
    negative = GenerationOptions(steps=2, seed=1, height=32, width=32, negative_prompt="a big red circle " * 8)
    probe = Probe(cross=True)
    r = edit(pipe, "a red circle", "a red square", EditOptions(blend=("circle", "square"), threshold=0.9), negative,
             extra=probe, progress=False)
    assert {p.shape[-1] for _, p in probe.seen} == {32} and r.controlled.latents.shape[0] == 2


def test_a_negative_prompt_on_flux2_klein_is_said_in_one_sentence(joint):
    """Flux.2 klein's pipeline has no place for a negative prompt (it guides against the empty one): refused by name,
    before any work. (Inversion and FlowEdit run on it, as on Qwen-Image and Z-Image: test_flow_families.)"""
    from prompt2prompt.errors import InputError

    pipe, _ = joint["flux2"]
    with pytest.raises(InputError, match="takes no negative prompt"):
        generate(pipe, ["a red circle"], None, GenerationOptions(steps=1, height=32, width=32,
                                                                 negative_prompt="blurry"), progress=False)


def test_flux2_controller_sees_the_conditional_call_only(joint):
    """Flux.2 klein runs guidance as two transformer calls a step, the conditional one first: the controller sees
    each attention module once a step, with the prompts' rows, and the unconditional call runs the stock processors."""
    pipe, _ = joint["flux2"]
    probe = Probe(cross=True)
    generate(pipe, ["a red circle", "a blue square"], probe, OPTS, progress=False)
    modules = len(pipe.transformer.attn_processors)
    assert len(probe.seen) == modules * OPTS.steps
    assert [s.step for s, _ in probe.seen] == [k for k in range(OPTS.steps) for _ in range(modules)]
    assert all(p.shape[0] == 2 and p.shape[-1] == 24 for _, p in probe.seen)
    single = next(p for s, p in probe.seen if s.layer.place == "single")
    assert single.shape[2] == 8 * 8  # image queries of the 32 px image: 16x16 latents in 2x2 patches


@pytest.mark.parametrize("kind", KINDS)
def test_identical_prompts_with_full_replacement_reproduce_the_source(joint, kind):
    pipe, _ = joint[kind]
    full = EditOptions(cross_steps=1.0, self_steps=1.0, self_max_side=64)
    r = edit(pipe, "a red circle", "a red circle", full, OPTS, vanilla=False, progress=False)
    torch.testing.assert_close(r.controlled.latents[1], r.controlled.latents[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_replacement_keeps_the_target_text_mass_and_the_source_row(joint, kind):
    """Renormalised replacement: each edited image query keeps its own total attention on the text, distributed as
    the source's (mapped); the source row never changes; "raw" takes the source's block as it is."""
    pipe, _ = joint[kind]
    prompts = ["a red circle", "a red square"]
    for mode in ("renormalize", "raw"):
        _, p2p, _ = edit_controllers(pipe, prompts, EditOptions(cross_steps=1.0, joint=mode), OPTS.steps,
                                     OPTS.max_sequence_length)
        before, after = Probe(cross=True), Probe(cross=True)
        generate(pipe, prompts, Controllers(before, p2p, after), OPTS, progress=False)
        for (_, pre), (_, post) in zip(before.seen, after.seen):
            torch.testing.assert_close(post[0], pre[0], atol=0, rtol=0)
            if mode == "renormalize":
                torch.testing.assert_close(post[1].sum(-1), pre[1].sum(-1), atol=1e-5, rtol=1e-5)
                shape = post[1] / post[1].sum(-1, keepdim=True)
                torch.testing.assert_close(shape, pre[0] / pre[0].sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(post[1], pre[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_local_blend_keeps_the_source_outside_the_mask(joint, kind):
    pipe, _ = joint[kind]
    prompts = ["a red circle and a blue cross", "a red square and a blue cross"]
    _, p2p, blend = edit_controllers(pipe, prompts, EditOptions(blend=("circle", "square"), threshold=0.9,
                                                                blend_start=0.0), OPTS.steps, OPTS.max_sequence_length)
    out = generate(pipe, prompts, edit_controller(p2p, blend), sized(kind), progress=False)
    outside = ~blend.mask[1, 0]  # (h, w) at the latents' size (Flux: its token grid)
    assert 0 < outside.sum() < outside.numel()
    latents = out.latents
    if latents.ndim == 3:  # packed: (prompts, tokens, channels) in grid order
        outside = outside.flatten()
        torch.testing.assert_close(latents[1][outside], latents[0][outside], atol=0, rtol=0)
    else:
        torch.testing.assert_close(latents[1][:, outside], latents[0][:, outside], atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_attend_and_edit_on_saved_folders(joint, kind, tmp_path):
    _, folder = joint[kind]
    common = ["--model", str(folder), "--steps", "2", "--height", "32", "--width", "32", "--quiet"]
    assert main(["attend", "a red circle and a blue square", "--out", str(tmp_path / "attend"), *common]) == 0
    settings = json.loads((tmp_path / "attend" / "settings.json").read_text())
    assert settings["family"] == kind and settings["text_part"] == ("clip" if kind == "sd3" else None)
    assert main(["edit", "a red circle and a blue square", "a red circle and a blue cross", "--blend", "square",
                 "cross", "--out", str(tmp_path / "edit"), *common]) == 0
    assert (tmp_path / "edit" / "blend_mask.png").exists()


def test_demo_runs_on_a_saved_sd3_folder(joint, tmp_path):
    _, folder = joint["sd3"]
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(folder), "--out", str(out), "--quiet"]) == 0
    numbers = json.loads((out / "demo.json").read_text())
    assert set(numbers) >= {"swap", "blend", "sweep", "swap_analysis", "pairs"}
    assert (out / "index.html").read_text().count("data:image/png;base64,") >= 12


@pytest.mark.parametrize("kind", ["flux2", "qwenimage", "zimage"])
def test_demo_runs_on_the_newer_families(joint, kind, tmp_path):
    """`p2p demo` on Flux.2 klein, Qwen-Image and Z-Image (run in-process at 32 px: these pipelines' own default is
    256 px or more on the tiny models, a minute of CPU each)."""
    from prompt2prompt.demo import quick_options, run_demo
    from prompt2prompt.loading import load_pipeline

    pipe = load_pipeline(joint[kind][1])
    pipe.default_sample_size = 16  # 16 latents x 2 (these tiny autoencoders' factor) = 32 px
    numbers = run_demo(pipe, tmp_path, quick_options(), model=str(joint[kind][1]), quiet=True)
    assert set(numbers) >= {"swap", "blend", "sweep", "swap_analysis", "pairs"}
    assert (tmp_path / "index.html").read_text().count("data:image/png;base64,") >= 12


@pytest.mark.parametrize("kind", KINDS)
def test_replacement_changes_the_edited_image_and_never_the_source(joint, kind):
    """Taking the source's image-to-text block moves the edited prompt's output (its attention output changes by
    (new - old) @ V_text), and the source row is the plain source."""
    pipe, _ = joint[kind]
    r = edit(pipe, "a red circle", "a red square", EditOptions(cross_steps=1.0, self_steps=0.0), OPTS,
             vanilla=True, progress=False)
    torch.testing.assert_close(r.controlled.latents[0], r.vanilla.latents[0], atol=1e-5, rtol=1e-5)
    assert (r.controlled.latents[1] - r.vanilla.latents[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_the_fallbacks_give_the_same_blocks(joint, kind, monkeypatch):
    """Without the kernel's logsumexp (gradients on, another device) the text-marker channel gives the same
    image-to-text block, and a plain softmax the same blocks over every key."""
    from prompt2prompt import joint as joint_module

    pipe, _ = joint[kind]
    prompts = ["a red circle and a blue square"]
    for cross in (True, None):
        fast = Probe(cross=cross)
        generate(pipe, prompts, fast, OPTS, progress=False)
        with monkeypatch.context() as m:
            m.setattr(joint_module, "attention_with_lse", lambda *a, **k: None)
            fallback = Probe(cross=cross)
            generate(pipe, prompts, fallback, OPTS, progress=False)
        assert len(fast.seen) == len(fallback.seen) > 0
        for (_, a), (_, b) in zip(fast.seen, fallback.seen):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_attention_with_lse_is_the_softmax_denominator():
    from prompt2prompt.joint import attention_with_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, 8**-0.5)
    scores = q @ k.transpose(-1, -2) * 8**-0.5
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["projected", "contiguous"])
@pytest.mark.parametrize("rows", [slice(0, 1), slice(1, 3), slice(0, 3)])
def test_window_and_folded_are_the_indexed_and_flattened_tensors(layout, rows):
    """The one-op views and copies of the joint path equal plain indexing, flattening and scaling, for a projected
    layout ((batch, tokens, heads, dim) transposed: heads of a row do not follow each other) and a contiguous one."""
    from prompt2prompt.joint import _folded, _window

    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 10, 4, 8, generator=g).transpose(1, 2) if layout == "projected" else \
        torch.randn(3, 4, 10, 8, generator=g)  # (batch, heads, tokens, dim)
    tokens, scale = slice(6, 10), torch.tensor(0.25)
    part = t[rows, :, tokens]
    torch.testing.assert_close(_window(t, rows, tokens), part, atol=0, rtol=0)
    torch.testing.assert_close(_window(t, rows, tokens, slice(2, 5)), part[..., 2:5], atol=0, rtol=0)
    lse = t[..., 0].contiguous()  # (batch, heads, tokens)
    torch.testing.assert_close(_window(lse, rows, tokens), lse[rows, :, tokens, None], atol=0, rtol=0)
    torch.testing.assert_close(_folded(part), part.flatten(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(_folded(part, scale), part.flatten(0, 1) * 0.25, atol=0, rtol=0)
    torch.testing.assert_close(_folded(part, transposed=True), part.flatten(0, 1).transpose(1, 2), atol=0, rtol=0)
    leaf = t.detach().requires_grad_()  # with autograd (training's grounding losses): the same values, gradients
    folded = _folded(_window(leaf, rows, tokens), scale, transposed=True)
    torch.testing.assert_close(folded, part.flatten(0, 1).transpose(1, 2) * 0.25, atol=0, rtol=0)
    folded.sum().backward()
    expected = torch.zeros_like(t)
    expected[rows, :, tokens] = 0.25
    torch.testing.assert_close(leaf.grad, expected, atol=0, rtol=0)
    # a view where the rows' heads fold into one batch dimension (no copy, no operation), else one copy
    folded = _folded(_window(t, rows, tokens))
    shares = folded.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert shares == (rows.stop - rows.start == 1 or layout == "contiguous")


@pytest.mark.parametrize("kind", KINDS)
def test_edit_through_the_text_keys_equals_the_edit_through_every_key(joint, kind):
    """An edit with local blend changes the output by (new - old) @ V over the text keys; with the blocks over every
    key read (a controller that wants the image blocks too, changing nothing) the same edit moves it by the change
    over every key, and gives the same result."""
    pipe, _ = joint[kind]
    prompts = ["a red circle and a blue cross", "a red square and a blue cross"]
    results = []
    for extra in ((), (Everything(),)):
        _, p2p, blend = edit_controllers(pipe, prompts, EditOptions(blend=("circle", "square")), OPTS.steps,
                                         OPTS.max_sequence_length)
        ctl = Controllers(*edit_controller(p2p, blend).controllers, *extra)
        results.append(generate(pipe, prompts, ctl, OPTS, progress=False).latents)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    assert not torch.equal(results[0][0], results[0][1])


@pytest.mark.parametrize("kind", ["sd3", "flux", "zimage"])
def test_controller_sees_each_prompts_own_conditional_rows(joint, kind):
    """In a batch of two prompts (SD3: unconditional rows first; Z-Image: conditional rows first; Flux: no
    unconditional rows) each row of the block a controller sees is that prompt's own conditional attention: the same
    as when the prompt runs alone, and different between the prompts."""
    pipe, _ = joint[kind]
    prompts = ["a red circle and a blue square", "a blue cross and a red circle"]
    both = Probe(cross=True)
    generate(pipe, prompts, both, OPTS, progress=False)
    for row, prompt in enumerate(prompts):
        alone = Probe(cross=True)
        generate(pipe, [prompt], alone, OPTS, progress=False)
        assert len(alone.seen) == len(both.seen) > 0
        for (_, b), (_, a) in zip(both.seen, alone.seen):
            width = a.shape[-1]  # Z-Image pads a batch's prompts to its longest: the padded keys get nothing
            torch.testing.assert_close(b[row:row + 1, ..., :width], a, atol=1e-5, rtol=1e-4)
            assert not b[row, ..., width:].any()
    assert all(not torch.allclose(b[0], b[1], atol=1e-4) for _, b in both.seen)


class Relaid(AttentionController):
    """Returns each text block unchanged in value but in another memory layout (heads outermost)."""

    def wants(self, site):
        return site.layer.is_cross

    def attention(self, probs, site):
        return probs.transpose(0, 1).contiguous().transpose(0, 1)


def test_a_block_returned_in_another_layout_changes_nothing(joint):
    pipe, _ = joint["sd3"]
    prompts = ["a red circle and a blue square", "a blue cross and a red circle"]
    stock = generate(pipe, prompts, None, OPTS, progress=False)
    relaid = generate(pipe, prompts, Relaid(), OPTS, progress=False)
    torch.testing.assert_close(relaid.latents, stock.latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_blocks_in_bf16_are_the_float32_blocks_to_its_precision(joint, kind):
    """A bf16 model's blocks are float32 (as controllers expect), sum with the image block to 1 per image query, and
    match the same pipeline's float32 blocks to bf16's precision."""
    _, folder = joint[kind]
    prompts = ["a red circle and a blue square"]
    seen = {}
    for dtype in (torch.float32, torch.bfloat16):
        probe = Probe()
        generate(load_pipeline(str(folder), dtype=dtype), prompts, probe, OPTS, progress=False)
        seen[dtype] = probe.seen
    half = seen[torch.bfloat16]
    assert len(half) == len(seen[torch.float32]) > 0
    texts = {(s.layer.name.rsplit(":", 1)[0], s.step): p for s, p in half if s.layer.is_cross}
    for site, block in half:
        assert block.dtype == torch.float32
        if not site.layer.is_cross:  # (SD3.5's image-only attention has no text block)
            text = texts.get((site.layer.name.rsplit(":", 1)[0], site.step))
            total = block.sum(-1) + (0 if text is None else text.sum(-1))
            torch.testing.assert_close(total, torch.ones_like(total), atol=2e-2, rtol=0)
    first = [(a, b) for (s, a), (_, b) in zip(seen[torch.float32], half) if s.step == 0]
    for a, b in first:  # the first step (the same latents in): only the precision differs
        torch.testing.assert_close(b, a, atol=2e-2, rtol=5e-2)


# -- an independent oracle: each family's joint softmax written out from diffusers' stock processor ------------------
# (JointAttnProcessor2_0, FluxAttnProcessor, Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor,
# QwenDoubleStreamAttnProcessor2_0, ZSingleStreamAttnProcessor, Flux3AttnProcessor in diffusers' transformer_*.py and
# attention_processor.py), from the module's own layers and its call's inputs as a forward pre-hook sees them; nothing
# of the library's (`Family.project`, joint.py) is used to get them.

ORACLE_PROMPTS = ["a red circle",  # the second prompt is longer: Qwen-Image and Z-Image mask the first one's padding
                  "a big red circle and a blue square next to a small green cross on a white background"]


def _oracle_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, tokens, heads, head_dim) float64."""
    return x.unflatten(-1, (heads, -1)).double()


def _oracle_qk(kind: str, name: str, attn, args: tuple, kwargs: dict, net_call: tuple) -> tuple:
    """(q, k (batch, tokens, heads, head_dim) float64, text slice, image slice, key mask (batch, tokens) bool or None)
    of one call of the attention module `name`, as the family's stock processor forms them; `net_call`: the
    transformer's (args, kwargs) of the same call."""
    from diffusers.models.embeddings import apply_rotary_emb

    h = args[0] if args else kwargs["hidden_states"]
    text_in = kwargs.get("encoder_hidden_states")
    heads, mask = attn.heads, None
    # Flux2ParallelSelfAttnProcessor: q, k, v, then the MLP
    if kind in ("flux2", "flux2dev") and hasattr(attn, "to_qkv_mlp_proj"):
        qkv = attn.to_qkv_mlp_proj(h)[..., : 3 * attn.inner_dim]
        q, k = (_oracle_heads(x, heads) for x in qkv.chunk(3, -1)[:2])
    else:
        assert not getattr(attn, "fused_projections", False)
        q, k = _oracle_heads(attn.to_q(h), heads), _oracle_heads(attn.to_k(h), heads)
    if attn.norm_q is not None:  # RMSNorm over head_dim: the same in (b, t, h, d) as in (b, h, t, d)
        q, k = attn.norm_q(q.float()).double(), attn.norm_k(k.float()).double()
    if text_in is not None:
        eq, ek = _oracle_heads(attn.add_q_proj(text_in), heads), _oracle_heads(attn.add_k_proj(text_in), heads)
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq.float()).double(), attn.norm_added_k(ek.float()).double()
    n, t = h.shape[1], 0 if text_in is None else text_in.shape[1]
    if kind == "sd3":  # image then text, no rotary
        if text_in is not None:
            q, k = torch.cat([q, eq], 1), torch.cat([k, ek], 1)
        return q, k, slice(n, n + t), slice(0, n), None
    if kind in ("flux", "flux2", "flux2dev"):  # text then image, Flux's real rotary over the joint sequence
        if text_in is not None:
            q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
        else:  # single-stream: the block concatenated the transformer's text in front of the image
            t = net_call[1]["encoder_hidden_states"].shape[1]
            n -= t
        cos, sin = (x.double() for x in kwargs["image_rotary_emb"])
        q, k = (apply_rotary_emb(x, (cos, sin), sequence_dim=1) for x in (q, k))
        return q, k, slice(0, t), slice(t, t + n), None
    if kind == "qwenimage":  # separate complex rotaries for image and text, then text before image
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        image_freqs, text_freqs = kwargs["image_rotary_emb"]
        q, k = (apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in (q, k))
        eq, ek = (apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in (eq, ek))
        q, k = torch.cat([eq, q], 1).double(), torch.cat([ek, k], 1).double()
        text_mask = kwargs.get("encoder_hidden_states_mask")
        if text_mask is not None:
            mask = torch.cat([text_mask.bool(), torch.ones(h.shape[:2], dtype=torch.bool)], 1)
        return q, k, slice(0, t), slice(t, t + n), mask
    if kind == "qwenimage21":  # one sequence, text then image, one complex rotary over it; padded text keys masked
        from diffusers.models.transformers.transformer_qwenimage21 import apply_rotary_emb_qwen

        q, k = (apply_rotary_emb_qwen(x, kwargs["rotary_emb"], use_real=False).double() for x in (q, k))
        t = net_call[1]["encoder_hidden_states"].shape[1]
        valid = kwargs.get("key_valid")
        return q, k, slice(0, t), slice(t, n), None if valid is None else valid.bool()
    if kind == "flux3":  # one sequence a call: text then image in a joint block, the image alone in its mode block
        cos, sin = (x.double() for x in kwargs["image_rotary_emb"])  # real rotary over the whole sequence
        q, k = (apply_rotary_emb(x, (cos, sin), sequence_dim=1) for x in (q, k))
        t = 0 if name.startswith("mode_blocks") else net_call[1]["encoder_hidden_states"].shape[1]
        return q, k, slice(0, t), slice(t, n), None
    assert kind == "zimage"  # one sequence: image tokens (padded to 32), caption (padded to 32), the batch's padding
    freqs = kwargs["freqs_cis"].unsqueeze(2)  # (batch, tokens, 1, head_dim / 2) complex

    def rotate(x):
        return torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs).flatten(3)

    q, k = rotate(q).double(), rotate(k).double()
    images, _, captions = net_call[0][:3]  # x, t, cap_feats: lists, the conditional rows first
    side = images[0].shape[-1] // 2  # 2x2 patches
    n = side * images[0].shape[-2] // 2
    if name.startswith("noise_refiner"):  # the image refiner: image tokens only
        return q, k, slice(n, n), slice(0, n), None
    start = -(-n // 32) * 32
    t = max(-(-len(c) // 32) * 32 for c in captions[: len(ORACLE_PROMPTS)])
    mask = kwargs.get("attention_mask")
    return q, k, slice(start, start + t), slice(0, n), None if mask is None else mask.reshape(mask.shape[0], -1).bool()


def _oracle_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) over every key, (batch, heads, tokens, tokens), padded keys excluded."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_recorded_blocks_equal_the_joint_softmax_written_out_from_the_stock_processor(joint_pipes, kind):
    """For every routed attention module of one step (double- and single-stream, joint and image-only), the blocks
    the recorder keeps (the conditional rows' image queries over the text keys, heads apart; over the image keys,
    head mean) equal softmax(Q K^T / sqrt(d)) computed here from the module's own projections, qk-norms, rotary and
    padding mask, in the family's text / image order, on the inputs the module got in a stock run."""
    from prompt2prompt.store import RecordOptions

    pipe = joint_pipes[kind]
    net = pipe.transformer
    opts = sized(kind, GenerationOptions(steps=1, seed=1, guidance=4.0,
                                         max_sequence_length=None if kind in ("qwenimage", "zimage") else 24))
    names = [n for n, m in net.named_modules() if hasattr(m, "set_processor")  # the modules with an image query
             and not n.startswith(("context_refiner", "txt_mode_blocks", "mode_blocks.image_cond"))]
    calls: dict = {}  # module name (or "" for the transformer) -> [(args, kwargs) of each call], in call order

    def keep(name):
        def hook(module, args, kwargs):
            calls.setdefault(name, []).append((args, dict(kwargs)))
        return hook

    hooks = [net.get_submodule(n).register_forward_pre_hook(keep(n), with_kwargs=True) for n in ["", *names]]
    try:
        stock = generate(pipe, ORACLE_PROMPTS, None, opts, progress=False)
        captured, calls = calls, {}
        store = AttentionStore(RecordOptions(self_res=(8,)))  # 8x8 image tokens in every family
        recorded = generate(pipe, ORACLE_PROMPTS, store, opts, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    two_calls = FAMILIES[kind].guidance_calls  # guidance as two calls a step, the conditional one first
    assert len(captured[""]) == (2 if two_calls else 1)
    prompts = len(ORACLE_PROMPTS)
    checked, masked = set(), False
    with torch.no_grad():
        for name in names:
            args, kwargs = captured[name][0]  # the conditional call's (the step's only call where guidance is rows)
            q, k, text, image, mask = _oracle_qk(kind, name, net.get_submodule(name), args, kwargs, captured[""][0])
            probs = _oracle_probs(q, k, mask)
            batch = probs.shape[0]
            # the conditional rows: the last ones on SD3 (diffusers' [negative, positive]), the first ones on Z-Image,
            # all of the conditional call on Flux.2 [klein] and Qwen-Image; Flux.1 runs no unconditional rows
            rows = slice(batch - prompts, batch) if kind == "sd3" else slice(0, prompts)
            assert batch == (2 * prompts if kind in ("sd3", "zimage") else prompts)
            cond = probs[rows, :, image]  # (prompts, heads, image queries, keys)
            key = f"{name}.processor"
            if text.stop > text.start:
                torch.testing.assert_close(store.mean(f"{key}:text").double(), cond[..., text], atol=1e-5, rtol=0)
                checked.add("single" if name.startswith("single") else "joint")
            else:
                assert f"{key}:text" not in store.sums
            torch.testing.assert_close(store.mean(f"{key}:image").double(), cond[..., image].mean(1), atol=1e-5,
                                       rtol=0)
            if mask is not None:  # padded keys of the first prompt's row: recorded as no attention
                padded = ~mask[rows, None, None, text].expand_as(cond[..., text])
                assert padded.any() and not store.mean(f"{key}:text")[padded].any()
                masked = True
    # text blocks compared
    assert checked == ({"joint", "single"} if kind in ("flux", "flux2", "flux2dev") else
                       {"single"} if kind == "flux3" else {"joint"})
    assert masked == (kind in ("qwenimage", "qwenimage21", "zimage"))  # the families masking a batch's padded text
    torch.testing.assert_close(recorded.latents, stock.latents, atol=1e-5, rtol=1e-5)  # recording changed nothing
