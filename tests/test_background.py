import random

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.background import feathered, keep_background
from prompt2prompt.cli import main
from prompt2prompt.edits import EditOptions, edit
from prompt2prompt.errors import PromptError
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.inversion import InversionOptions, invert
from prompt2prompt.shapes import world

CAPTION = "a blue square and a yellow cross"


def test_feather_is_the_mask_inside_and_nothing_beyond_its_radius():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 1] = True  # pixels 4..7 x 4..7 at 16x16
    alpha = feathered(mask, (16, 16), radius=2)[0, 0]
    assert alpha.shape == (16, 16)
    assert torch.all(alpha[4:8, 4:8] == 1)
    # chessboard distance 1, 2, 3 from the mask's pixels: 2/3, 1/3, 0
    assert alpha[3, 5] == pytest.approx(2 / 3) and alpha[8, 8] == pytest.approx(2 / 3)
    assert alpha[2, 5] == pytest.approx(1 / 3) and alpha[9, 2] == pytest.approx(1 / 3)
    assert alpha[1, 5] == 0 and alpha[10, 10] == 0 and alpha[15, 15] == 0
    assert torch.equal(feathered(mask, (16, 16), 0)[0, 0], alpha == 1)


def test_keep_background_takes_the_originals_pixels_bit_for_bit():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    edited = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 2:, 2:] = True
    (out,), alpha = keep_background([edited], original, mask, radius=1)
    out, a = np.asarray(out), alpha[0, 0].numpy()
    assert np.array_equal(out[a == 0], np.asarray(original)[a == 0]) and (a == 0).sum() > 0
    assert np.array_equal(out[a == 1], np.asarray(edited)[a == 1]) and (a == 1).sum() > 0
    with pytest.raises(ValueError, match="must match"):
        keep_background([edited.resize((8, 8))], original, mask, 1)


@pytest.fixture(scope="module")
def drawn(shapes):
    scene = world.scene_from_caption(CAPTION, random.Random(3))
    image = scene.image()
    return image, invert(shapes, image, CAPTION, InversionOptions(method="ddim", steps=10), progress=False)


def test_a_real_image_edit_with_a_blend_keeps_the_input_outside_the_mask(shapes, drawn):
    """Outside the feathered mask the edited picture is the input, exactly; inside, the edit's own pixels; without
    the option the decoded pixels outside are not the input's (the autoencoder's decode moves them)."""
    image, inv = drawn
    target = CAPTION.replace("cross", "circle")
    options = EditOptions(blend=("cross", "circle"))
    kept = edit(shapes, CAPTION, target, options, inversion=inv, vanilla=False, progress=False)
    plain = edit(shapes, CAPTION, target, EditOptions(blend=("cross", "circle"), keep_background=False),
                 inversion=inv, vanilla=False, progress=False)
    alpha = kept.kept[0, 0].numpy()  # (H, W)
    picture, decoded, source = (np.asarray(i, dtype=np.int16) for i in (kept.controlled.images[1],
                                                                         plain.controlled.images[1], image))
    outside, inside = alpha == 0, alpha == 1
    assert 0.2 < outside.mean() < 0.95 and inside.any()
    assert np.abs(picture - source)[outside].max() == 0
    assert np.abs(decoded - source)[outside].max() > 8  # the shift this option removes
    assert np.array_equal(picture[inside], decoded[inside])
    assert kept.controlled.images[0] == plain.controlled.images[0]  # the source row is the reconstruction in both
    assert kept.settings["background"] == {**kept.settings["background"], "kept": True, "feather": 4}
    assert plain.settings["background"] == {"kept": False} and plain.kept is None
    wide = edit(shapes, CAPTION, target, EditOptions(blend=("cross", "circle"), feather=12), inversion=inv,
                vanilla=False, progress=False)
    assert (wide.kept[0, 0] == 0).sum() < outside.sum()  # a wider band keeps fewer pixels of the input


def test_edits_without_a_blend_or_an_inversion_are_not_composited(shapes, drawn):
    _, inv = drawn
    r = edit(shapes, CAPTION, CAPTION.replace("cross", "circle"), inversion=inv, vanilla=False, progress=False)
    assert r.kept is None and "background" not in r.settings
    r = edit(shapes, CAPTION, CAPTION.replace("cross", "circle"), EditOptions(blend=("cross", "circle")),
             GenerationOptions(steps=4), vanilla=False, progress=False)
    assert r.kept is None and "background" not in r.settings


@pytest.mark.parametrize("value", [-1, 65, 2.5, True])
def test_feather_is_checked(value):
    with pytest.raises(PromptError, match="feather must be a whole number of pixels from 0 to 64"):
        EditOptions(feather=value)


@pytest.mark.parametrize("flags, missing", [(["--feather", "3"], "no --from"),
                                            (["--no-keep-background"], "no --from"),
                                            (["--feather", "3", "--from", "x.safetensors"], "no --blend")])
def test_background_flags_need_an_inversion_and_a_blend(tmp_path, capsys, flags, missing):
    code = main(["edit", CAPTION, CAPTION.replace("cross", "circle"), *flags, "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "expected --from INVERSION and --blend WORD" in err and missing in err
    assert err.count("\n") == 1 and not (tmp_path / "never").exists()
