import numpy as np
import pytest
import torch

from prompt2prompt.attend import attend
from prompt2prompt.errors import InputError, P2PError
from prompt2prompt.generation import GenerationOptions
from prompt2prompt.maps import CrossAttentionMaps, HeatMap
from prompt2prompt.store import RecordOptions

OPTS = GenerationOptions(steps=3, seed=1)


@pytest.fixture(scope="module")
def result(sd1):
    return attend(sd1, ["a red circle and a xylophone", "a blue square"], OPTS, model="tiny", progress=False)


def test_maps_shape_and_normalisation(result):
    maps = result.maps()
    assert maps.values.shape == (2, 16, 16, 77)  # upsampled to the largest recorded side
    assert maps.settings["selection"]["layers"] == len(result.store.select(True))
    # every layer's rows sum to 1, so the average does too (bilinear upsampling keeps that)
    torch.testing.assert_close(maps.values.sum(-1), torch.ones(2, 16, 16), atol=1e-4, rtol=0)


def test_selection_by_resolution_place_and_heads(result):
    store = result.store
    low = result.maps(res=8)
    assert low.values.shape[1:3] == (8, 8)
    names = store.select(True, 8, ("up",))
    assert names and all(store.layers[n].place == "up" for n in names)
    up8 = result.maps(res=8, places=("up",), heads=(0,))
    manual = sum(store.mean(n)[:, 0].reshape(2, 8, 8, 77) for n in names) / len(names)
    torch.testing.assert_close(up8.values, manual)
    with pytest.raises(P2PError, match="recorded sides"):
        result.maps(res=5)


def test_word_maps_sum_the_word_tokens(result):
    maps = result.maps(res=16)
    positions = result.prompts[0].positions("xylophone")
    assert len(positions) > 1
    word = maps.word("xylophone")
    torch.testing.assert_close(word.values, maps.values[0, :, :, list(positions)].sum(-1))
    assert maps.word("square", prompt=1).label == "square"
    with pytest.raises(P2PError, match="its words are: a, blue, square"):
        maps.word("circle", prompt=1)


def test_argmax_ignores_start_and_padding(result):
    maps = result.maps()
    end = result.prompts[1].end
    idx = maps.argmax(1)
    assert idx.shape == (16, 16)
    assert int(idx.min()) >= 1 and int(idx.max()) < end
    with_all = maps.argmax(1, ignore_start=False, ignore_padding=False)
    torch.testing.assert_close(with_all, maps.values[1].argmax(-1))


def test_heatmap_helpers():
    values = torch.zeros(4, 4)
    values[1:3, 1:3] = 2.0
    hm = HeatMap(values, "x")
    assert hm.normalized().max() == 1 and hm.normalized().min() == 0
    assert hm.mask(0.5).sum() == 4
    assert hm.mask(0.5, size=(8, 8)).shape == (8, 8)
    from PIL import Image

    over = hm.overlay(Image.new("RGB", (32, 32), "white"))
    assert over.size == (32, 32)
    assert np.asarray(hm.image(16)).shape == (16, 16, 3)


def test_self_attention_components(result):
    sm = result.self_maps()
    assert sm.size == (16, 16)
    comps = sm.components(4)
    assert comps.shape == (4, 16, 16)
    flat = comps.reshape(4, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_self_attention_can_be_switched_off(sd1):
    r = attend(sd1, "a circle", OPTS, RecordOptions(self_attention=False), progress=False)
    with pytest.raises(P2PError, match="no self-attention"):
        r.self_maps()


def test_steps_window_is_respected(sd1):
    r = attend(sd1, "a circle", GenerationOptions(steps=5), RecordOptions(steps=(1, 3)), progress=False)
    assert set(r.store.counts.values()) == {2}


def test_save_and_load_round_trip(result, tmp_path):
    maps = result.maps(res=16)
    path = maps.save(tmp_path / "maps")
    assert path.name == "maps.safetensors" and (tmp_path / "maps.json").exists()
    back = CrossAttentionMaps.load(path)
    torch.testing.assert_close(back.values, maps.values)
    assert back.prompts == maps.prompts
    assert back.settings["seed"] == 1 and back.settings["prompts"][1] == "a blue square"
    torch.testing.assert_close(back.word("xylophone").values, maps.word("xylophone").values)
    with pytest.raises(InputError, match="no maps file"):
        CrossAttentionMaps.load(tmp_path / "missing.safetensors")


def test_token_indices_are_checked(result):
    maps = result.maps()
    assert maps.token(50).label == "<pad>"  # padding positions exist, read by token()
    with pytest.raises(P2PError, match="token index 50 is padding"):  # word() takes the prompt's own tokens only
        maps.word(50)
    assert maps.token(2).label == "red"
    for bad in (77, -1):
        with pytest.raises(P2PError, match="outside 0..76"):
            maps.word(bad)
        with pytest.raises(P2PError, match="outside 0..76"):
            maps.token(bad)
