import pytest
import torch

from prompt2prompt.attention import AttentionController, Controllers
from prompt2prompt.edits import EditOptions, LocalBlend, edit, edit_controllers
from prompt2prompt.errors import PromptError
from prompt2prompt.generation import GenerationOptions, generate

GEN = GenerationOptions(steps=6, seed=2)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_no_replacement_equals_vanilla(pipes, kind):
    pipe = pipes[kind]
    off = EditOptions(cross_steps=0.0, self_steps=0.0)
    r = edit(pipe, "a red circle", ["a red square", "a big red circle"], off, GEN, progress=False)
    torch.testing.assert_close(r.controlled.latents, r.vanilla.latents, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_identical_prompts_full_replacement(pipes, kind):
    full = EditOptions(cross_steps=1.0, self_steps=1.0, self_max_side=64)
    r = edit(pipes[kind], "a red circle", "a red circle", full, GEN, vanilla=False, progress=False)
    torch.testing.assert_close(r.controlled.latents[1], r.controlled.latents[0], atol=1e-5, rtol=1e-5)


def test_replacement_changes_the_edit_but_never_the_source(sd1):
    r = edit(sd1, "a red circle", "a red square", EditOptions(), GEN, progress=False)
    torch.testing.assert_close(r.controlled.latents[0], r.vanilla.latents[0], atol=1e-4, rtol=1e-4)
    assert (r.controlled.latents[1] - r.vanilla.latents[1]).abs().max() > 1e-3
    assert r.settings["mode"] == "replace"


def test_auto_mode_picks_refine_for_added_words(sd1):
    r = edit(sd1, "a circle", "a red circle", EditOptions(), GEN, vanilla=False, progress=False)
    assert r.settings["mode"] == "refine"
    with pytest.raises(PromptError, match="'red'"):
        edit(sd1, "a circle", "a red circle", EditOptions(mode="replace"), GEN, progress=False)


def test_reweight_of_one_changes_nothing(sd1):
    base = edit(sd1, "a red circle", "a red square", EditOptions(), GEN, vanilla=False, progress=False)
    ones = EditOptions(reweight=(("square", 1.0), ("red", 1.0)))
    same = edit(sd1, "a red circle", "a red square", ones, GEN, vanilla=False, progress=False)
    torch.testing.assert_close(same.controlled.latents, base.controlled.latents, atol=0, rtol=0)
    louder = edit(sd1, "a red circle", "a red square", EditOptions(reweight=(("square", 3.0),)), GEN,
                  vanilla=False, progress=False)
    assert (louder.controlled.latents[1] - base.controlled.latents[1]).abs().max() > 1e-4


def test_reweight_scales_only_the_word_in_the_schedule(sd1):
    seen = {}

    class Probe(AttentionController):
        def wants(self, site):
            return site.layer.is_cross

        def attention(self, probs, site):
            seen.setdefault(site.step, probs.clone())

    opts = EditOptions(mode="reweight", cross_steps=0.5, reweight=(("circle", -1.0),))
    tokens, p2p, _ = edit_controllers(sd1, ["a red circle", "a red circle"], opts, 4)
    generate(sd1, ["a red circle", "a red circle"], Controllers(p2p, Probe()), GenerationOptions(steps=4),
             progress=False)
    src, tgt = seen[0][0], seen[0][1]
    torch.testing.assert_close(tgt[..., 3], -src[..., 3])  # "circle" is token 3, factor -1
    torch.testing.assert_close(tgt[..., :3], src[..., :3])
    assert not torch.allclose(seen[3][1][..., 3], -seen[3][0][..., 3])  # step 3 is outside the first half


def test_local_blend_keeps_latents_outside_the_mask(sd1):
    steps = 8
    opts = EditOptions(blend=("circle", "square"), threshold=0.97, blend_start=0.25)  # random model: flat maps
    prompts = ["a red circle and a blue cross", "a red square and a blue cross"]
    tokens, p2p, blend = edit_controllers(sd1, prompts, opts, steps)
    assert blend.start == 2
    record = []

    class AfterBlend(AttentionController):
        def step_end(self, step, timestep, latents):
            mask = None if blend.mask is None else blend.mask.clone()
            record.append((step, mask, latents.clone()))

    generate(sd1, prompts, Controllers(blend, p2p, AfterBlend()), GenerationOptions(steps=steps, seed=4),
             progress=False)
    assert [s for s, _, _ in record] == list(range(steps))
    checked = 0
    for step, mask, latents in record:
        if step < 2:
            assert mask is None
            continue
        outside = ~mask[1, 0]  # (h, w)
        assert 0 < outside.sum() < outside.numel()  # a real mask: some inside, some outside
        torch.testing.assert_close(latents[1][:, outside], latents[0][:, outside], atol=0, rtol=0)
        checked += 1
    assert checked == steps - 2


def test_blend_mask_is_the_union_of_source_and_edit(sd1):
    tokens, _, blend = edit_controllers(sd1, ["a red circle", "a red square"], EditOptions(blend=("circle", "square")),
                                        4)
    assert blend.words[0, 3] == 1 and blend.words[1, 3] == 1 and blend.words.sum() == 2
    generate(sd1, ["a red circle", "a red square"], blend, GenerationOptions(steps=4), progress=False)
    own = blend._mask(blend.acc)
    torch.testing.assert_close(blend.mask[1], own[0] | own[1])


def test_errors_name_the_offending_word(sd1):
    with pytest.raises(PromptError, match="'lion'"):
        edit(sd1, "a red circle", "a red square", EditOptions(blend=("lion",)), GEN, progress=False)
    with pytest.raises(PromptError, match="'lion'"):
        edit(sd1, "a red circle", "a red square", EditOptions(reweight=(("lion", 2.0),)), GEN, progress=False)
    with pytest.raises(PromptError, match="unknown edit mode"):
        edit(sd1, "a red circle", "a red square", EditOptions(mode="swap"), GEN, progress=False)
    with pytest.raises(PromptError, match="at least one edited prompt"):
        edit(sd1, "a red circle", [], EditOptions(), GEN, progress=False)


def test_local_blend_class_alone_needs_words(sd1):
    from prompt2prompt.tokens import PromptTokens

    toks = [PromptTokens.from_tokenizer(sd1.tokenizer, p) for p in ("a circle", "a square")]
    with pytest.raises(PromptError, match="'cross'"):
        LocalBlend(toks, ("cross",))


def test_edits_run_under_another_scheduler(sd1):
    from diffusers import EulerDiscreteScheduler

    original = sd1.scheduler
    sd1.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        off = edit(sd1, "a red circle", "a red square", EditOptions(cross_steps=0.0, self_steps=0.0), GEN,
                   progress=False)
        torch.testing.assert_close(off.controlled.latents, off.vanilla.latents, atol=0, rtol=0)
        on = edit(sd1, "a red circle", "a red square", EditOptions(blend=("circle", "square"), threshold=0.97), GEN,
                  vanilla=False, progress=False)
        assert on.mask is not None and torch.isfinite(on.controlled.latents).all()
    finally:
        sd1.scheduler = original
