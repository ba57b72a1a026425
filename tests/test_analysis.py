import torch

from prompt2prompt.analysis import swap_analysis, word_index_map
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.maps import CrossAttentionMaps
from prompt2prompt.tokens import PromptTokens


def test_word_index_map_follows_the_argmax(tokenizer):
    tokens = PromptTokens.from_tokenizer(tokenizer, "a xylophone circle")
    values = torch.zeros(1, 2, 2, 77)
    xylo = tokens.positions("xylophone")
    values[0, 0, 0, xylo[-1]] = 1  # a later token of the multi-token word
    values[0, 0, 1, tokens.positions("circle")[0]] = 1
    values[0, 1, :, 0] = 1  # the start token: ignored, so the next best wins
    values[0, 1, :, 1] = 0.5  # "a"
    maps = CrossAttentionMaps(values, [tokens])
    assert word_index_map(maps, 0).tolist() == [[1, 2], [0, 0]]


def test_swap_analysis_counts_changed_pixels(sd1):
    r = swap_analysis(sd1, "a red circle", "a red square", GenerationOptions(steps=4, seed=5), progress=False)
    src = word_index_map(r.first_step_maps, 0)
    tgt = word_index_map(r.first_step_maps, 1)
    assert r.argmax_changed == float((src != tgt).float().mean())
    assert r.swapped_word_share[0] == float((src == 2).float().mean())  # "circle" is word 2
    # same seed, same first latent: the source rows are identical in both runs
    torch.testing.assert_close(r.vanilla.latents[0], r.controlled.latents[0], atol=1e-4, rtol=1e-4)
    assert len(r.drift_vanilla) == 4 and r.drift_vanilla[-1] > 0
