import pytest
import torch

from prompt2prompt.attention import AttentionController, Controllers
from prompt2prompt.edits import EditOptions, LocalBlend, edit, edit_controller, edit_controllers
from prompt2prompt.errors import PromptError
from prompt2prompt.generation import GenerationOptions, generate
from prompt2prompt.tokens import PromptTokens

GEN = GenerationOptions(steps=6, seed=2)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_no_replacement_equals_vanilla(pipes, kind):
    pipe = pipes[kind]
    off = EditOptions(cross_steps=0.0, self_steps=0.0)
    r = edit(pipe, "a red circle", ["a red square", "a big red circle"], off, GEN, vanilla=True, progress=False)
    torch.testing.assert_close(r.controlled.latents, r.vanilla.latents, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_identical_prompts_full_replacement(pipes, kind):
    full = EditOptions(cross_steps=1.0, self_steps=1.0, self_max_side=64)
    r = edit(pipes[kind], "a red circle", "a red circle", full, GEN, vanilla=False, progress=False)
    torch.testing.assert_close(r.controlled.latents[1], r.controlled.latents[0], atol=1e-5, rtol=1e-5)


def test_replacement_changes_the_edit_but_never_the_source(sd1):
    r = edit(sd1, "a red circle", "a red square", EditOptions(), GEN, vanilla=True, progress=False)
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
                   vanilla=True, progress=False)
        torch.testing.assert_close(off.controlled.latents, off.vanilla.latents, atol=0, rtol=0)
        on = edit(sd1, "a red circle", "a red square", EditOptions(blend=("circle", "square"), threshold=0.97), GEN,
                  vanilla=False, progress=False)
        outside = ~on.mask[1, 0]
        assert 0 < outside.sum() < outside.numel()
        torch.testing.assert_close(on.controlled.latents[1][:, outside], on.controlled.latents[0][:, outside],
                                   atol=0, rtol=0)
    finally:
        sd1.scheduler = original


class Probe(AttentionController):
    """Records the probabilities a layer ends up with (put it after the edit) or starts with (before it)."""

    def __init__(self, cross: bool | None = None):
        self.cross = cross
        self.seen: list = []  # (site, probs)

    def wants(self, site):
        return self.cross is None or site.layer.is_cross == self.cross

    def attention(self, probs, site):
        self.seen.append((site, probs.clone()))


def test_self_attention_is_replaced_only_at_small_maps_and_in_its_steps(sd1):
    """self_max_side=8 on 16x16 latents: the 8x8 self-attention of every edited prompt is the source's, in the
    self_steps span only; the 16x16 maps keep their own."""
    prompts = ["a red circle", "a red square", "a blue cross"]
    opts = EditOptions(cross_steps=0.0, self_steps=(0.25, 0.75), self_max_side=8)
    _, p2p, _ = edit_controllers(sd1, prompts, opts, 4)
    after = Probe(cross=False)
    generate(sd1, prompts, Controllers(p2p, after), GenerationOptions(steps=4, seed=1), progress=False)
    checked = set()
    # the first self-attention of the first step comes before any text enters: equal for every prompt by itself
    assert after.seen[0][0].step == 0 and after.seen[0][0].layer.name.startswith("down_blocks.0")
    for site, probs in after.seen[1:]:
        replaced = torch.equal(probs[1], probs[0]) and torch.equal(probs[2], probs[0])
        assert replaced == (max(site.res) <= 8 and 1 <= site.step < 3), (site.res, site.step)
        checked.add((max(site.res), replaced))
    assert checked == {(16, False), (8, False), (8, True)}


def test_default_self_rule_is_a_quarter_of_the_latent(sd1):
    """On 32x32 latents (maps 32 and 16) a quarter is 8: no self-attention layer is small enough to be replaced."""
    _, p2p, _ = edit_controllers(sd1, ["a red circle", "a red square"], EditOptions(self_steps=1.0), 2)
    after = Probe(cross=False)
    generate(sd1, ["a red circle", "a red square"], Controllers(p2p, after),
             GenerationOptions(steps=2, height=64, width=64), progress=False)
    assert after.seen and not any(p2p.wants(site) for site, _ in after.seen)
    assert p2p.self_side == 8 and {max(site.res) for site, _ in after.seen} == {32, 16}


def test_refine_keeps_new_tokens_own_attention(sd1):
    prompts = ["a circle", "a big red circle"]
    tokens, p2p, _ = edit_controllers(sd1, prompts, EditOptions(cross_steps=1.0), 2)
    before, after = Probe(cross=True), Probe(cross=True)
    generate(sd1, prompts, Controllers(before, p2p, after), GenerationOptions(steps=2), progress=False)
    new = list(tokens[1].positions("big")) + list(tokens[1].positions("red"))
    for (_, pre), (_, post) in zip(before.seen, after.seen):
        torch.testing.assert_close(post[1][..., new], pre[1][..., new], atol=0, rtol=0)  # their own
        torch.testing.assert_close(post[1][..., tokens[1].positions("circle")[0]], pre[0][..., 2])  # the source's
        torch.testing.assert_close(post[1][..., 0], pre[0][..., 0])


def test_replace_with_more_than_two_targets(sd1):
    prompts = ["a red circle", "a red square", "a blue circle", "a green cross"]
    tokens, p2p, _ = edit_controllers(sd1, prompts, EditOptions(cross_steps=1.0), 2)
    after = Probe(cross=True)
    generate(sd1, prompts, Controllers(p2p, after), GenerationOptions(steps=2), progress=False)
    for _, probs in after.seen:
        for k in (1, 2, 3):
            torch.testing.assert_close(probs[k], probs[0])  # same token counts: the source's attention, every target


def test_blend_mask_is_thresholded_max_pooled_attention(sd1):
    """One hot pixel in the accumulated word attention becomes a 3x3 block (the max-pool), nearest-resized."""
    tokens = [PromptTokens.from_tokenizer(sd1.tokenizer, p) for p in ("a circle", "a square")]
    blend = LocalBlend(tokens, ("circle", "square"), threshold=0.5)
    blend.latent_size = (16, 16)
    acc = torch.zeros(2, 8, 8)
    acc[:, 3, 4] = 1.0
    mask = blend._mask(acc)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:5, 3:6] = True
    assert torch.equal(mask, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert blend._mask(acc, pool=False)[0, 0].sum() == 4  # the subtract mask is not pooled (as the p2p code)


def test_subtract_words_keep_their_region(sd1):
    prompts = ["a red circle and a blue cross", "a red square and a blue cross"]
    opts = EditOptions(blend=("circle", "square"), subtract=("cross",), threshold=0.9)
    _, p2p, blend = edit_controllers(sd1, prompts, opts, 4)
    generate(sd1, prompts, edit_controller(p2p, blend), GenerationOptions(steps=4, seed=4), progress=False)
    own = blend._mask(blend.acc)
    keep_out = blend._mask(blend.acc_sub, pool=False)
    own, keep_out = own[:1] | own, keep_out[:1] | keep_out
    assert (own[1] & keep_out[1]).any()  # the subtract word's region overlaps the blend words' ...
    assert not (blend.mask[1] & keep_out[1]).any()  # ... and nothing it marks may change
    assert torch.equal(blend.mask[1], own[1] & ~keep_out[1])


def test_blend_reads_the_models_map_side_summed_over_layers_and_steps(sd1):
    """The blend's accumulated map is the words' head-mean attention at the map side (16 on these 16x16 latents),
    summed over those layers and the steps; an explicit blend_res reads that side instead."""
    prompts = ["a red circle", "a red square"]
    for res in (None, 8):
        tokens, p2p, blend = edit_controllers(sd1, prompts, EditOptions(blend=("circle", "square"), blend_res=res), 3)
        before = Probe(cross=True)
        generate(sd1, prompts, Controllers(before, *edit_controller(p2p, blend).controllers),
                 GenerationOptions(steps=3), progress=False)
        side = res or 16
        words = blend.words
        expected = sum(torch.einsum("phqk,pk->pq", probs, words).reshape(2, side, side) / probs.shape[1]
                       for site, probs in before.seen if site.res == (side, side))
        assert blend.side == side and blend.acc.shape == (2, side, side)
        torch.testing.assert_close(blend.acc, expected.float())
    with pytest.raises(PromptError, match="sides 16, 8"):
        edit(sd1, prompts[0], prompts[1], EditOptions(blend=("circle", "square"), blend_res=4), GEN, progress=False)


def test_local_blend_wants_is_pure(sd1):
    from prompt2prompt.attention import LayerInfo, RunInfo, Site

    tokens = [PromptTokens.from_tokenizer(sd1.tokenizer, p) for p in ("a circle", "a square")]
    blend = LocalBlend(tokens, ("circle", "square"))
    blend.begin(RunInfo((16, 16), 2, 4, torch.device("cpu"), torch.float32, 10, (16, 8)))
    small = Site(LayerInfo("a.attn2.processor", "down", 1, True, 2, 1), (8, 8), 0)
    large = Site(LayerInfo("b.attn2.processor", "up", 1, True, 2, 0), (16, 16), 0)
    assert [blend.wants(s) for s in (small, large, small, large)] == [False, True, False, True]
    assert blend.acc is None


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_edits_keep_the_source_under_stochastic_schedulers(sd1, name):
    import diffusers

    original = sd1.scheduler
    sd1.scheduler = getattr(diffusers, name).from_config(original.config)
    try:
        full = EditOptions(cross_steps=1.0, self_steps=1.0, self_max_side=64)
        same = edit(sd1, "a red circle", "a red circle", full, GEN, vanilla=False, progress=False)
        torch.testing.assert_close(same.controlled.latents[1], same.controlled.latents[0], atol=1e-5, rtol=1e-5)
        opts = EditOptions(blend=("circle", "square"), threshold=0.9, blend_start=0.0)
        r = edit(sd1, "a red circle", "a red square", opts, GEN, vanilla=True, progress=False)
        outside = ~r.mask[1, 0]
        assert 0 < outside.sum() < outside.numel()
        torch.testing.assert_close(r.controlled.latents[1][:, outside], r.controlled.latents[0][:, outside],
                                   atol=0, rtol=0)
        # float error only (explicit vs fused attention), which ancestral noise grows: 1.35e-4 in one element of 1024
        # with transformers 5.25 (the code before the explicit path changed gave the same), hence 5e-4
        torch.testing.assert_close(r.controlled.latents[0], r.vanilla.latents[0], atol=5e-4, rtol=1e-4)
    finally:
        sd1.scheduler = original


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_schedules_are_fractions_of_the_real_loop(sd1, name):
    """10 Heun steps are 19 loop iterations: cross-attention replaced for int(0.8 * 19) = 15, blend from int(0.2 * 19)
    = 3 (counting callbacks as steps gave 8 and 2)."""
    import diffusers

    original = sd1.scheduler
    sd1.scheduler = getattr(diffusers, name).from_config(original.config)
    try:
        prompts = ["a red circle", "a red square"]
        _, p2p, blend = edit_controllers(sd1, prompts, EditOptions(blend=("circle", "square"), threshold=0.9), 10)
        after = Probe(cross=True)
        masks = []

        class Masks(AttentionController):
            def step_end(self, step, timestep, latents):
                masks.append(blend.mask is not None)

        generate(sd1, prompts, Controllers(*edit_controller(p2p, blend).controllers, after, Masks()),
                 GenerationOptions(steps=10), progress=False)
    finally:
        sd1.scheduler = original
    replaced = sorted({s.step for s, probs in after.seen if torch.equal(probs[1], probs[0])})
    assert replaced == list(range(15))
    assert masks == [False] * 3 + [True] * 16


def test_identical_prompts_non_square(sd1):
    full = EditOptions(cross_steps=1.0, self_steps=1.0, self_max_side=64)
    r = edit(sd1, "a red circle", "a red circle", full, GenerationOptions(steps=3, height=48, width=80),
             vanilla=False, progress=False)
    assert r.controlled.images[0].size == (80, 48)
    torch.testing.assert_close(r.controlled.latents[1], r.controlled.latents[0], atol=1e-5, rtol=1e-5)


def test_prompts_over_the_token_limit(sd1):
    long = "a red circle and " + " and ".join(["a blue square"] * 30)
    tokens = PromptTokens.from_tokenizer(sd1.tokenizer, long)
    assert len(tokens.tokens) == 77 and tokens.truncated.endswith("a blue square")
    assert tokens.positions("circle") == (3,)
    r = edit(sd1, long, long.replace("circle", "cross", 1), EditOptions(cross_steps=1.0), GEN, vanilla=False,
             progress=False)
    assert r.settings["mode"] == "replace"
    with pytest.raises(PromptError, match="'triangle'"):
        edit(sd1, long + " and a triangle", long + " and a cross", EditOptions(blend=("triangle",)), GEN,
             progress=False)


def test_options_are_validated_before_any_work():
    for bad, match in [({"mode": "reweight"}, "at least one word"), ({"threshold": 1.0}, "between 0 and 1"),
                       ({"threshold": float("nan")}, "between 0 and 1"), ({"blend_start": 2.0}, "local-blend start"),
                       ({"reweight": (("circle", float("inf")),)}, "finite"), ({"cross_steps": 1.5}, "fraction"),
                       ({"self_steps": (0.6, 0.2)}, "pair"), ({"subtract": ("x",)}, "only make sense"),
                       ({"self_max_side": 0}, "positive"), ({"pooled": "mine"}, "pooled")]:
        with pytest.raises(PromptError, match=match):
            EditOptions(**bad)


def test_sdxl_pooled_embedding_from_the_source(pipes):
    """pooled="source": every prompt's pooled text embedding (SDXL's added text condition) is the source's."""
    pipe = pipes["sdxl"]
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True)
    try:
        prompts = ["a red circle", "a red square"]
        edit(pipe, *prompts, EditOptions(pooled="source"), GEN, vanilla=False, progress=False)
        source_run, seen[:] = list(seen), []
        edit(pipe, *prompts, EditOptions(), GEN, vanilla=False, progress=False)
        own_run = list(seen)
    finally:
        hook.remove()
    cond = source_run[0][2:]  # [unconditional x2, conditional x2]
    torch.testing.assert_close(cond[1], cond[0], atol=0, rtol=0)
    assert not torch.equal(own_run[0][3], own_run[0][2])
