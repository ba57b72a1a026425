"""Results show themselves in a notebook: a PNG picture with token labels (`_repr_png_`) and a one-line summary."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import prompt2prompt as p2p
from prompt2prompt.analysis import swap_analysis
from prompt2prompt.edits import EditOptions, edit

OPTIONS = p2p.GenerationOptions(steps=2)


def _picture(obj) -> Image.Image:
    data = obj._repr_png_()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def _one_line(obj, *words) -> str:
    text = repr(obj)
    assert "\n" not in text and len(text) < 300, text
    assert all(w in text for w in words), text
    return text


@pytest.fixture(scope="module")
def attended(sd1):
    return p2p.attend(sd1, "a red circle and a blue square", OPTIONS, progress=False)


def test_attention_results_show_pictures_with_their_tokens(attended):
    # the image and one overlay per token (a, red, circle, and, a, blue, square, <end>): 9 cells, 8 to a row
    assert _picture(attended).size[0] > 8 * 128
    _one_line(attended, "AttendResult", "'a red circle and a blue square'", "2 steps")
    maps = attended.maps()
    assert _picture(maps).size[0] >= 8 * 96  # one map per token
    _one_line(maps, "CrossAttentionMaps", "circle", "square")
    heat = maps.word("circle")
    assert _picture(heat).size[0] >= 160
    assert _one_line(heat).startswith("HeatMap('circle', ")


def test_edit_and_swap_results_show_their_grids(sd1):
    r = edit(sd1, "a red circle", "a blue circle", EditOptions(), OPTIONS, vanilla=True, progress=False)
    picture = _picture(r)
    assert picture.size[0] >= 2 * 160 and picture.size[1] >= 2 * 160  # two prompts, vanilla and controlled rows
    _one_line(r, "EditResult", "'a blue circle'", "replace", "vanilla and controlled")
    alone = edit(sd1, "a red circle", "a blue circle", EditOptions(), OPTIONS, progress=False)  # the default
    assert _picture(alone).size[1] < picture.size[1] and alone.vanilla is None
    _one_line(alone, "controlled, 2 steps")
    swap = swap_analysis(sd1, "a red circle", "a blue circle", OPTIONS, progress=False)
    assert _picture(swap).size[0] >= 2 * 320
    _one_line(swap, "SwapAnalysis", "of pixels change their word")


def test_a_trace_shows_its_maps(sd1):
    with p2p.trace(sd1) as tc:
        pass
    assert tc._repr_png_() is None  # nothing traced: no picture
    with p2p.trace(sd1) as tc:
        sd1("a red circle", num_inference_steps=2)
    assert _picture(tc).size[0] >= 96
    _one_line(tc, "Trace", "2 steps")


def test_an_inversion_shows_its_image(sd1):
    from prompt2prompt.inversion import InversionOptions, invert

    inv = invert(sd1, Image.new("RGB", (32, 32), (200, 30, 30)), "a red circle",
                 InversionOptions(method="ddim", steps=2), progress=False)
    assert _picture(inv).size[0] >= 160
    _one_line(inv, "Inversion", "'a red circle'", "ddim")
