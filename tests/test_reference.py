"""Reference mode reproduces the Prompt-to-Prompt code's edits exactly: each rule against the re-statement of the
original formulas in p2p_original.py, and the defaults' documented differences."""

import pytest
import torch

import p2p_original as original
from prompt2prompt.alignment import reference_refine_alignment, reference_replace_mapper, replace_mapper
from prompt2prompt.attention import AttentionController, Controllers, LayerInfo, RunInfo, Site
from prompt2prompt.edits import EditOptions, PromptToPrompt, edit_controller, edit_controllers
from prompt2prompt.errors import PromptError
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.schedule import resolve_cross
from prompt2prompt.tokens import PromptTokens

REPLACE_PAIRS = [
    ("a red circle and a blue square", "a red circle and a blue triangle"),
    ("a squirrel eating a burger", "a xylophone eating a burger"),  # a one-token word becomes several
    ("a squirrel eating a burger", "a lion eating a pizza"),
]
REFINE_PAIRS = [
    ("a squirrel eating a burger", "a watercolor painting of a squirrel eating a burger"),
    ("a circle", "a xylophone circle"),
    ("a red circle", "a big red circle and a circle"),  # repeated words: the tie-breaking shows
    ("a cat and a dog", "a dog and a cat and a bird"),  # aligned tokens that differ
]


def pt(tokenizer, text):
    return PromptTokens.from_tokenizer(tokenizer, text)


@pytest.mark.parametrize("pair", REPLACE_PAIRS)
def test_replace_mapper_is_the_originals(tokenizer, pair):
    x, y = pair
    torch.testing.assert_close(reference_replace_mapper(pt(tokenizer, x), pt(tokenizer, y)),
                               original.replacement_mapper(x, y, tokenizer), atol=0, rtol=0)


def test_default_replace_realigns_the_end_token_where_the_original_does_not(tokenizer):
    x, y = REPLACE_PAIRS[1]
    src, tgt = pt(tokenizer, x), pt(tokenizer, y)
    ours, ref = replace_mapper(src, tgt), reference_replace_mapper(src, tgt)
    assert ours[src.end, tgt.end] == 1  # end token to end token
    assert ref[src.end, tgt.end] == 0 and ref[tgt.end, tgt.end] == 1  # the original: position to position


@pytest.mark.parametrize("pair", REFINE_PAIRS)
def test_refine_alignment_is_the_originals(tokenizer, pair):
    x, y = pair
    mapper, alphas = original.refinement_mapper(x, y, tokenizer)
    al = reference_refine_alignment(pt(tokenizer, x), pt(tokenizer, y))
    torch.testing.assert_close(al.weight, alphas, atol=0, rtol=0)
    taken = alphas > 0  # where alpha is 0 the source index is multiplied by 0 (the original's -1 picks the last)
    assert torch.equal(al.index[taken], mapper[taken])


@pytest.mark.parametrize("steps", [7, 10, 50])
@pytest.mark.parametrize("spans", [0.8, (0.2, 0.6), {"default": 1.0, "lion": 0.4}, {"lion": (0.1, 0.5)}])
def test_cross_schedule_is_the_originals(tokenizer, steps, spans):
    prompts = ["a red cat", "a red lion", "a blue lion"]
    targets = [pt(tokenizer, p) for p in prompts[1:]]
    ours = resolve_cross(spans, targets).table(steps, reference=True)
    theirs_spans = {("default_" if k == "default" else k): v for k, v in spans.items()} if isinstance(spans, dict) \
        else spans
    theirs = original.time_word_alpha(prompts, steps, theirs_spans, tokenizer)
    torch.testing.assert_close(ours, theirs[:steps], atol=0, rtol=0)


def test_default_schedule_is_the_plain_fraction(tokenizer):
    targets = [pt(tokenizer, "a red lion")]
    assert resolve_cross(0.8, targets).table(7)[:, 0, 0].tolist() == [1, 1, 1, 1, 1, 0, 0]  # int(0.8 * 7) = 5
    assert resolve_cross(0.8, targets).table(7, reference=True)[:, 0, 0].tolist() == [1] * 6 + [0]  # int(0.8 * 8)


def _run(steps: int) -> RunInfo:
    return RunInfo((16, 16), 2, 4, torch.device("cpu"), torch.float32, steps, (16, 8))


def _cross(step: int, pixels: int = 64) -> Site:
    side = int(pixels**0.5)
    return Site(LayerInfo("x.attn2.processor", "up", 0, True, 2, 1), (side, side), step)


def _random_probs(prompts: int, heads: int = 2, queries: int = 64) -> torch.Tensor:
    return torch.rand(prompts, heads, queries, 77).softmax(-1)


@pytest.mark.parametrize("mode", ["replace", "replace-identity", "refine"])
def test_edited_cross_attention_is_the_originals(tokenizer, mode):
    word = "burger"
    if mode == "replace":
        prompts = ["a squirrel eating a burger", "a xylophone eating a burger", "a lion eating a pizza"]
    elif mode == "replace-identity":  # words of equal token counts: every token maps to itself (no product taken)
        prompts, word = ["a red circle and a blue square", "a red circle and a blue triangle"], "triangle"
    else:
        prompts = ["a squirrel eating a burger", "a watercolor painting of a squirrel eating a burger"]
    mode = mode.removesuffix("-identity")
    tokens = [pt(tokenizer, p) for p in prompts]
    spans = {"default": 0.8, word: 0.3}
    p2p = PromptToPrompt(tokens, EditOptions.reference(mode=mode, cross_steps=spans), steps=10)
    p2p.begin(_run(10))
    if mode == "replace":
        assert p2p.identity == (word == "triangle")
    alpha = original.time_word_alpha(prompts, 10, {"default_": 0.8, word: 0.3}, tokenizer)
    for step in (0, 3, 9):
        probs = _random_probs(len(prompts))
        got = p2p.attention(probs.clone(), _cross(step))
        if mode == "replace":
            mapper = torch.stack([original.replacement_mapper(prompts[0], p, tokenizer) for p in prompts[1:]])
            want = original.replace_cross(probs[0], probs[1:], mapper, alpha[step])
        else:
            mapper, alphas = original.refinement_mapper(prompts[0], prompts[1], tokenizer)
            want = original.refine_cross(probs[0], probs[1:], mapper[None], alphas[None], alpha[step])
        torch.testing.assert_close(got[0], probs[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1:], want, atol=1e-6, rtol=1e-6)


def test_reweight_is_the_originals(tokenizer):
    prompts = ["a smiling cat", "a smiling cat"]
    tokens = [pt(tokenizer, p) for p in prompts]
    p2p = PromptToPrompt(tokens, EditOptions.reference(mode="reweight", reweight=(("smiling", 5.0),)), steps=10)
    p2p.begin(_run(10))
    probs = _random_probs(2)
    got = p2p.attention(probs.clone(), _cross(0))
    equalizer = torch.ones(1, 77)
    equalizer[:, original.word_inds(prompts[1], "smiling", tokenizer)] = 5.0
    want = probs[0][None] * equalizer[:, None, None, :]  # alpha is 1 at step 0 (cross_steps 0.8)
    torch.testing.assert_close(got[1:], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("notebook,limit", [("stable", 16 * 16), ("null-text", 32 * 32)])
def test_self_attention_rule_is_the_notebooks(tokenizer, notebook, limit):
    tokens = [pt(tokenizer, p) for p in ("a cat", "a dog")]
    p2p = PromptToPrompt(tokens, EditOptions.reference(notebook, self_steps=1.0), steps=10)
    p2p.begin(RunInfo((64, 64), 2, 4, torch.device("cpu"), torch.float32, 10, (64, 32, 16, 8)))
    for side in (8, 16, 32, 64):
        site = Site(LayerInfo("x.attn1.processor", "up", 0, False, 2, 0), (side, side), 0)
        assert p2p.wants(site) == (side * side <= limit)


def test_reference_local_blend_is_the_originals(sd1):
    """The mask the original computes from its (aliased, so edited) attention store equals reference mode's."""
    prompts = ["a red circle and a blue cross", "a red square and a blue cross"]
    options = EditOptions.reference(blend=("circle", "square"), subtract=("red", "red"), threshold=0.8)
    tokens, p2p, blend = edit_controllers(sd1, prompts, options, 4)
    assert blend.start == 0  # the stable notebook blends from the first step

    class Recorder(AttentionController):  # what the original's store holds: the 16x16 cross maps after the edit
        maps: dict = {}

        def wants(self, site):
            return site.layer.is_cross and site.res == (16, 16)

        def attention(self, probs, site):
            self.maps[site.layer.name] = self.maps.get(site.layer.name, 0) + probs.float()

    recorder = Recorder()
    generate(sd1, prompts, Controllers(edit_controller(p2p, blend), recorder), GenerationOptions(steps=4, seed=1),
             progress=False)
    maps = torch.cat([m.reshape(2, -1, 1, 16, 16, 77) for m in recorder.maps.values()], dim=1)
    alpha = torch.zeros(2, 1, 1, 1, 1, 77)
    sub = torch.zeros(2, 1, 1, 1, 1, 77)
    for k, (prompt, word) in enumerate(zip(prompts, ("circle", "square"))):
        alpha[k, ..., original.word_inds(prompt, word, sd1.tokenizer)] = 1
        sub[k, ..., original.word_inds(prompt, "red", sd1.tokenizer)] = 1
    want = original.blend_mask(maps, alpha, (16, 16), 0.8, sub)
    assert want[1].any() and not want[1].all()
    assert torch.equal(blend.mask, want)


def test_reference_blend_words_pair_with_prompts(sd1):
    with pytest.raises(PromptError, match="pair with the prompts"):
        edit_controllers(sd1, ["a red circle", "a red square"], EditOptions.reference(blend=("circle",)), 4)
    _, _, blend = edit_controllers(sd1, ["a red circle", "a blue circle"],
                                   EditOptions.reference(blend=("circle", "blue")), 4)
    assert blend.words[0].nonzero().flatten().tolist() == [3]  # "circle" in the source only
    assert blend.words[1].nonzero().flatten().tolist() == [2]  # "blue" in the edited prompt only
    with pytest.raises(PromptError, match="'red' is not a word of the prompt 'a blue circle'"):
        edit_controllers(sd1, ["a red circle", "a blue circle"], EditOptions.reference(blend=("circle", "red")), 4)
