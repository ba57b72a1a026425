import numpy as np
import torch

from prompt2prompt import plot
from prompt2prompt.analysis import swap_analysis
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.shapes.world import COLOURS


def test_token_colours_are_not_the_shapes_worlds_colours_and_are_distinct():
    world = np.array([[255 * c for c in rgb] for rgb in COLOURS.values()])
    colours = [plot.token_colour(p) for p in range(77)]  # a CLIP sequence's positions
    assert len(set(colours)) == 77
    nearest = min(np.sqrt(((world - np.array(c)) ** 2).sum(1)).min() for c in colours)
    assert nearest > 90  # RGB distance: no token's colour reads as red, orange, yellow, green, blue or purple


def test_a_tokens_colour_does_not_depend_on_the_other_tokens_present():
    labels = {1: "1: a", 2: "2: red", 3: "3: circle"}
    both = plot.argmax_image(np.array([[2, 3], [3, 3]]), labels, size=2)
    alone = plot.argmax_image(np.array([[3, 3], [3, 3]]), labels, size=2)
    assert both.getpixel((1, 1)) == alone.getpixel((1, 1)) == plot.token_colour(3)
    assert both.getpixel((0, 0)) == plot.token_colour(2)


def test_swap_legend_numbers_repeated_words_as_the_maps_do(sd1):
    from prompt2prompt.display import swap_figures

    r = swap_analysis(sd1, "a red circle and a square", "a red circle and a cross", GenerationOptions(steps=2, seed=1),
                      progress=False)
    picture = np.asarray(swap_figures(r)["argmax_step0_0"])
    tokens = r.first_step_maps.prompts[0]
    first = {w.tokens[0] for w in tokens.words}
    positions = r.first_step_maps.argmax(0)  # token positions; every word here is one token
    assert set(torch.unique(positions).tolist()) <= first
    present = [plot.token_colour(p) for p in torch.unique(positions).tolist()]
    seen = {tuple(c) for c in picture.reshape(-1, picture.shape[-1])[:, :3]}
    assert all(c in seen for c in present)  # each present word in its position's colour, as in the attention figures
