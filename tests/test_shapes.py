import random

import numpy as np
import pytest

from prompt2prompt.shapes import world
from prompt2prompt.shapes.evaluate import classify_shape, largest_part, score_image, segment
from prompt2prompt.tokens import PromptTokens


def test_world_is_seeded_and_masks_match_the_render():
    a_scenes, a = world.batch(seed=5, count=8)
    b_scenes, b = world.batch(seed=5, count=8)
    assert np.array_equal(a, b) and [s.caption for s in a_scenes] == [s.caption for s in b_scenes]
    for scene, image in zip(a_scenes, a):
        masks = scene.masks()
        assert len(masks) == len(scene.objects) in (1, 2)
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()
        for obj, mask in zip(scene.objects, masks):
            assert mask.sum() > 50
            expected = np.array(world.COLOURS[obj.colour]) * 2 - 1
            np.testing.assert_allclose(image[:, mask].T, np.broadcast_to(expected, (mask.sum(), 3)), atol=1e-6)


def test_captions_follow_the_grammar():
    rng = random.Random(0)
    for _ in range(200):
        scene = world.sample_scene(rng)
        specs = world.parse_caption(scene.caption)
        assert [s for _, s in specs] == [o.shape for o in scene.objects]
        for (colour, _), obj in zip(specs, scene.objects):
            assert colour in (None, obj.colour)
        assert " a orange" not in scene.caption and not scene.caption.startswith("a orange")
    with pytest.raises(ValueError, match="names no shape"):
        world.parse_caption("a red blob")


def test_scene_from_caption_honours_it():
    scene = world.scene_from_caption("a red circle and a square", random.Random(3))
    assert [(o.colour, o.shape) for o in scene.objects][0] == ("red", "circle")
    assert scene.objects[1].shape == "square" and scene.objects[1].colour != "red"


def test_three_object_scenes_are_separate_named_and_scored_right():
    """Training's contrast scenes: three different shapes and colours, apart, all named in order; the evaluator finds
    all three on the render."""
    rng = random.Random(8)
    scenes = [world.sample_scene(rng, two_objects=0.5, three_objects=0.3, margin=4.0) for _ in range(300)]
    three = [s for s in scenes if len(s.objects) == 3]
    assert 60 < len(three) < 120 and {len(s.objects) for s in scenes} == {1, 2, 3}
    for scene in three:
        assert len({o.shape for o in scene.objects}) == len({o.colour for o in scene.objects}) == 3
        assert [shape for _, shape in world.parse_caption(scene.caption)] == [o.shape for o in scene.objects]
        masks = scene.masks()
        assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any() and not (masks[1] & masks[2]).any()
        row = score_image(scene.render(), scene.caption)
        assert (row["named"], row["objects"]) == (3, 3) and all(row["colour_ok"]) and all(row["shape_ok"])
    scene = world.scene_from_caption("a red circle and a square and a blue cross", random.Random(3))
    assert [(o.colour, o.shape) for o in scene.objects][::2] == [("red", "circle"), ("blue", "cross")]
    assert scene.objects[1].shape == "square" and scene.objects[1].colour not in ("red", "blue")
    with pytest.raises(ValueError, match="at most 1"):
        world.sample_scene(rng, two_objects=0.9, three_objects=0.2)


def test_evaluator_captions_are_unchanged_by_the_three_object_option():
    """The evaluator's 200 captions (seed 1234, the default mix) are those every earlier measurement used: the option
    draws nothing extra when it is off."""
    rng = random.Random(1234)
    captions = [world.sample_scene(rng).caption for _ in range(200)]
    assert captions[::40] == ["a blue cross and a yellow circle", "a blue circle", "a blue triangle and a green cross",
                              "a red circle", "a yellow cross"]
    assert max(c.count(" and ") for c in captions) == 1


def test_evaluator_recognises_rendered_truth():
    rng = random.Random(11)
    colour, shape, both = [], [], []
    for _ in range(120):
        scene = world.sample_scene(rng)
        row = score_image(scene.render(), scene.caption)
        colour += row["colour_ok"]
        shape += row["shape_ok"]
        if "both" in row:
            both.append(row["both"])
    assert all(colour) and all(shape) and all(both)


def test_segment_and_classify_each_shape():
    for k, shape in enumerate(world.SHAPES):
        colour = sorted(world.COLOURS)[k]
        scene = world.Scene((world.WorldObject(shape, colour, (30.0, 33.0), 9.0),), 0.5, f"a {colour} {shape}")
        regions = segment(scene.render())
        assert list(regions) == [colour]
        assert classify_shape(regions[colour])[0] == shape
    assert segment(np.full((64, 64, 3), 0.5, dtype=np.float32)) == {}


def test_dark_tints_and_specks_do_not_fool_the_shape_test():
    # what an autoencoder does to a dark picture: faint colour casts in the grey, a few stray coloured pixels
    scene = world.Scene((world.WorldObject("cross", "blue", (40.0, 40.0), 12.0),), 0.2, "a blue cross")
    image = scene.render()
    image[..., 2] += np.where(scene.masks()[0], 0, 0.15)  # a bluish cast: chroma 0.15, saturation 0.43
    image[2:8, 2:8] = world.COLOURS["blue"]  # a 36-pixel speck far from the cross
    regions = segment(image)
    assert list(regions) == ["blue"]
    assert classify_shape(regions["blue"])[0] == "cross"
    assert largest_part(regions["blue"]).sum() == scene.masks()[0].sum()


def test_world_words_are_single_tokens(tokenizer):
    for word in world.vocabulary():
        p = PromptTokens.from_tokenizer(tokenizer, word)
        assert p.tokens == ("<start>", word, "<end>")


def test_tokenizer_files_are_reproducible(tmp_path):
    from prompt2prompt.shapes.tokenizer import train_tokenizer

    a, b = train_tokenizer(tmp_path / "a"), train_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_count_is_exact_on_the_worlds_renders_including_touching_objects():
    from prompt2prompt.shapes.evaluate import count_objects, count_summary

    rng = random.Random(21)
    rows = []
    for k in range(300):
        scene = world.sample_scene(rng, two_objects=0.5 + 0.5 * (k % 2), margin=0.0 if k % 3 else 6.0)
        rows.append(score_image(scene.render(), scene.caption))
    summary = count_summary(rows)
    assert summary["exact_count"] == summary["exact_count_one"] == summary["exact_count_two"] == 1.0
    assert summary["duplicates"] == summary["misses"] == 0.0
    # two objects of different colours whose boxes touch: still two
    touching = world.Scene((world.WorldObject("square", "red", (20.0, 32.0), 10.0),
                            world.WorldObject("square", "blue", (37.0, 32.0), 10.0)), 0.2, "a red square and a blue "
                           "square")
    masks = touching.masks()
    grown = np.zeros_like(masks[0])
    grown[:, 1:] |= masks[0][:, :-1]
    assert (grown & masks[1]).any()  # they share an edge
    assert count_objects(segment(touching.render())) == 2
    # one colour in two places is two objects (a duplicate); one object alone is a miss
    twice = world.Scene((world.WorldObject("circle", "red", (15.0, 15.0), 8.0),
                         world.WorldObject("circle", "red", (45.0, 45.0), 8.0)), 0.8, "a red circle")
    row = score_image(twice.render(), "a red circle")
    assert (row["named"], row["objects"]) == (1, 2)
    alone = score_image(twice.render()[:32, :32], "a red circle and a blue square")
    assert (alone["named"], alone["objects"]) == (2, 1)
    assert count_summary([row, alone]) == {"exact_count": 0.0, "exact_count_one": 0.0, "exact_count_two": 0.0,
                                           "duplicates": 0.5, "misses": 0.5}


def test_evaluate_runs_the_extra_controller_and_records_its_seeds(sd1):
    """evaluate() puts a caller's controller in the loop beside its recorder (benchmarks/guidance.py uses it), and
    its settings name the seed the captions and latents came from, not the generation options' own seed."""
    from prompt2prompt.attention import AttentionController
    from prompt2prompt.generation import GenerationOptions
    from prompt2prompt.shapes.evaluate import evaluate

    class Steps(AttentionController):
        def __init__(self):
            self.seen = []

        def wants(self, site):
            return False

        def step_end(self, step, timestep, latents):
            self.seen.append((step, latents.shape[0]))

    steps = Steps()
    result = evaluate(sd1, count=3, seed=77, options=GenerationOptions(steps=2, height=64, width=64), batch=2,
                      progress=False, controller=steps)
    assert steps.seen == [(0, 2), (1, 2), (0, 1), (1, 1)]  # every step of both batches
    assert result.settings["seed"] == 77 and len(result.per_caption) == 3
