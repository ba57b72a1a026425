import numpy as np

from prompt2prompt.measure import EditPair, grow, sample_pairs, sample_refine_pairs, score_edit, summarize
from prompt2prompt.shapes import world


def render(objects, background=0.5):
    scene = world.Scene(tuple(objects), background, world.caption_for(tuple(objects), (True,) * len(objects)))
    return scene.image()


def obj(shape, colour, x, y, r=9.0):
    return world.WorldObject(shape, colour, (x, y), r)


PAIR = EditPair("a red circle and a blue square", "a red circle and a blue triangle", 1, "shape", "square",
                "triangle", ("square", "triangle"), 0)


def test_sample_pairs_are_one_word_swaps():
    pairs = sample_pairs(60, seed=3)
    assert len(pairs) == 60 and pairs == sample_pairs(60, seed=3)
    kinds = {p.kind for p in pairs}
    assert kinds == {"shape", "colour"}
    for p in pairs:
        a, b = p.source.split(), p.target.split()
        diff = [(x, y) for x, y in zip(a, b) if x != y and x not in ("a", "an")]
        assert diff == [(p.old, p.new)]
        assert all(w in p.source or w in p.target for w in p.blend)


def test_perfect_edit_scores():
    source = render([obj("circle", "red", 16, 16), obj("square", "blue", 46, 46)])
    edited = render([obj("circle", "red", 16, 16), obj("triangle", "blue", 46, 46)])
    s = score_edit(PAIR, source, edited)
    assert s.keep_iou == 1.0 and s.edit_ok
    assert s.outside_mad == 0.0 and s.outside_psnr >= 99


def test_moved_layout_and_failed_edit():
    source = render([obj("circle", "red", 16, 16), obj("square", "blue", 46, 46)])
    moved = render([obj("circle", "red", 46, 16), obj("square", "blue", 16, 46)], background=0.3)
    s = score_edit(PAIR, source, moved)
    assert s.keep_iou == 0.0 and not s.edit_ok  # the circle moved away; still a square
    assert s.outside_psnr < 20


def test_colour_edit_recognised():
    pair = EditPair("a red circle and a blue square", "a red circle and a green square", 1, "colour", "blue", "green",
                    ("square",), 0)
    source = render([obj("circle", "red", 16, 16), obj("square", "blue", 46, 46)])
    edited = render([obj("circle", "red", 16, 16), obj("square", "green", 46, 46)])
    s = score_edit(pair, source, edited)
    assert s.edit_ok and s.keep_iou == 1.0 and s.outside_mad == 0.0


def test_grow_and_summarize():
    m = np.zeros((9, 9), dtype=bool)
    m[4, 4] = True
    assert grow(m, 2).sum() == 25
    source = render([obj("circle", "red", 16, 16), obj("square", "blue", 46, 46)])
    s = score_edit(PAIR, source, source)
    summary = summarize([s, s])
    assert summary["pairs"] == 2 and summary["keep_iou"] == 1.0 and summary["edit_ok"] == 0.0


def test_run_pairs_splits_by_kind(sd1):
    from prompt2prompt.generation import GenerationOptions
    from prompt2prompt.measure import VARIANTS, run_pairs

    pairs = sample_pairs(6, seed=3)
    kinds = [p.kind for p in pairs]
    assert {"shape", "colour"} <= set(kinds)
    result = run_pairs(sd1, pairs, GenerationOptions(steps=2), progress=False)
    for v in VARIANTS:
        per = [row[v] for row in result["pairs"]]
        for kind in ("shape", "colour"):
            part = result["by_kind"][kind][v]
            assert part["pairs"] == kinds.count(kind)
            expected = [s["outside_psnr"] for s, k in zip(per, kinds) if k == kind]
            assert np.isclose(part["outside_psnr"], np.mean(expected))


def test_refine_pairs_name_one_colour_more():
    pairs = sample_refine_pairs(40, seed=5)
    assert len(pairs) == 40 and pairs == sample_refine_pairs(40, seed=5) and {p.edited for p in pairs} == {0, 1}
    for p in pairs:
        specs, target = world.parse_caption(p.source), world.parse_caption(p.target)
        assert specs[p.edited] == (None, target[p.edited][1]) and target[p.edited][0] == p.new
        assert specs[1 - p.edited] == target[1 - p.edited] and specs[1 - p.edited][0] is not None
        assert len(p.target.split()) == len(p.source.split()) + 1 and p.blend == (target[p.edited][1],)


def test_refine_edit_scores():
    pair = EditPair("a red circle and a square", "a red circle and a blue square", 1, "refine", "", "blue",
                    ("square",), 0)
    source = render([obj("circle", "red", 16, 16), obj("square", "yellow", 46, 46)])  # the model chose yellow
    edited = render([obj("circle", "red", 16, 16), obj("square", "blue", 46, 46)])
    s = score_edit(pair, source, edited)
    assert s.keep_iou == 1.0 and s.edit_ok and s.outside_mad == 0.0  # the yellow square's place is the edit's
    moved = render([obj("circle", "red", 46, 16), obj("triangle", "blue", 16, 46)])
    s = score_edit(pair, source, moved)
    assert s.keep_iou == 0.0 and not s.edit_ok  # layout lost, and a triangle is not the square


def test_run_pairs_names_refine_variants(sd1):
    from prompt2prompt.edits import edit
    from prompt2prompt.generation import GenerationOptions
    from prompt2prompt.measure import run_pairs

    pairs = sample_refine_pairs(2, seed=1)
    assert edit(sd1, pairs[0].source, pairs[0].target, generation=GenerationOptions(steps=1), vanilla=False,
                progress=False).settings["mode"] == "refine"
    result = run_pairs(sd1, pairs, GenerationOptions(steps=2), progress=False)
    assert list(result["summary"]) == ["vanilla", "refine", "refine+blend"] and list(result["by_kind"]) == ["refine"]
    assert result["summary"]["refine"]["pairs"] == 2 and set(result["pairs"][0]) == {"pair", *result["summary"]}
