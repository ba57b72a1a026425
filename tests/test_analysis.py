import pytest
import torch

from prompt2prompt.analysis import drift, first_step_change, swap_analysis
from prompt2prompt.edits import LatentTrace
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.maps import CrossAttentionMaps
from prompt2prompt.tokens import PromptTokens


def test_word_index_follows_the_argmax(tokenizer):
    tokens = PromptTokens.from_tokenizer(tokenizer, "a xylophone circle")
    values = torch.zeros(1, 2, 2, 77)
    xylo = tokens.positions("xylophone")
    values[0, 0, 0, xylo[-1]] = 1  # a later token of the multi-token word
    values[0, 0, 1, tokens.positions("circle")[0]] = 1
    values[0, 1, :, 0] = 1  # the start token: ignored, so the next best wins
    values[0, 1, :, 1] = 0.5  # "a"
    maps = CrossAttentionMaps(values, [tokens])
    assert maps.word_index(0).tolist() == [[1, 2], [0, 0]]


def test_first_step_change_on_hand_built_maps(tokenizer):
    """Four pixels, "a red circle" against "a red square": pixel (0, 0) moves from "red" to "square", (0, 1) attends
    to the swapped word in both (the same word of the prompt), (1, 0) moves from "circle" to "red", (1, 1) from "a" to
    "square". Three of four pixels change their word; the swapped word is the most attended at 2 of 4 pixels in the
    source and 3 of 4 in the target."""
    src = PromptTokens.from_tokenizer(tokenizer, "a red circle")
    tgt = PromptTokens.from_tokenizer(tokenizer, "a red square")
    values = torch.zeros(2, 2, 2, 77)
    for prompt, tokens, layout in ((0, src, [["red", "circle"], ["circle", "a"]]),
                                   (1, tgt, [["square", "square"], ["red", "square"]])):
        for i in range(2):
            for j in range(2):
                values[prompt, i, j, tokens.positions(layout[i][j])[0]] = 1.0
    changed, share = first_step_change(CrossAttentionMaps(values, [src, tgt]))
    assert changed == 0.75 and share == (0.5, 0.75)


def test_drift_on_known_latents():
    trace = LatentTrace()
    source = torch.ones(1, 4, 2, 2)
    for scale in (1.0, 2.0, 0.5):  # target = scale * source: |t - s| / |s| = |scale - 1|
        trace.step_end(0, 0, torch.cat([source, scale * source]))
    assert drift(trace) == pytest.approx([0.0, 1.0, 0.5])


def test_swap_analysis_of_a_prompt_with_itself_finds_no_change(sd1):
    """Independent of the formulas: the same prompt twice from one seed changes no pixel's word and never drifts."""
    r = swap_analysis(sd1, "a red circle", "a red circle", GenerationOptions(steps=3, seed=5), progress=False)
    assert r.argmax_changed == 0.0 and r.swapped_word_share == (0.0, 0.0)
    assert r.drift_vanilla == [0.0, 0.0, 0.0] and r.drift_controlled == [0.0, 0.0, 0.0]


def test_swap_analysis_of_a_swap_measures_its_first_step_maps(sd1):
    r = swap_analysis(sd1, "a red circle", "a red square", GenerationOptions(steps=4, seed=5), progress=False)
    # same seed, same first latent: the source rows are identical in both runs
    torch.testing.assert_close(r.vanilla.latents[0], r.controlled.latents[0], atol=1e-4, rtol=1e-4)
    assert (r.argmax_changed, r.swapped_word_share) == first_step_change(r.first_step_maps)
    final = r.vanilla.latents.float()
    assert r.drift_vanilla[-1] == pytest.approx(float((final[1] - final[0]).norm() / final[0].norm()), rel=1e-5)
    assert len(r.drift_vanilla) == len(r.drift_controlled) == 4
