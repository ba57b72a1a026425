"""Study files: parsing, the cases a grid expands to, and one clear sentence for each bad input."""

from pathlib import Path

import pytest

from prompt2prompt.edits import EditOptions
from prompt2prompt.errors import InputError
from prompt2prompt.study import load, parse

EXAMPLES = Path(__file__).parent.parent / "examples"
EDIT = {"source": "a red circle and a blue square", "target": "a red circle and a blue triangle"}


def test_grid_expands_in_order_with_settings_layered():
    study = parse({"generation": {"steps": 7}, "options": {"threshold": 0.4},
                   "edits": [{**EDIT, "options": {"blend": ["square", "triangle"], "threshold": 0.5},
                              "generation": {"seed": 9}}],
                   "grid": {"seed": [1, 2], "cross_steps": [0.2, 0.8], "reweight": [{}, {"blue": 2}]}})
    assert [c.factors for c in study.cases][:3] == [{"seed": 1, "cross_steps": 0.2, "reweight": {}},
                                                    {"seed": 1, "cross_steps": 0.2, "reweight": {"blue": 2}},
                                                    {"seed": 1, "cross_steps": 0.8, "reweight": {}}]
    assert len(study.cases) == 8 and [c.index for c in study.cases] == list(range(8))
    first = study.cases[0]
    assert first.generation.steps == 7 and first.generation.seed == 1  # the grid's seed wins over the edit's
    assert first.options.threshold == 0.5 and first.options.blend == ("square", "triangle")
    assert study.cases[1].options.reweight == (("blue", 2),)
    assert len({c.id for c in study.cases}) == 8
    again = parse({"edits": [EDIT], "grid": {"seed": [2, 1]}})  # ids name settings, not positions
    assert again.cases[0].id == parse({"edits": [EDIT], "grid": {"seed": [1, 2]}}).cases[1].id


def test_control_none_and_local_blend_off():
    study = parse({"edits": [{**EDIT, "options": {"blend": ["square", "triangle"]}}],
                   "grid": {"control": ["none", "p2p"], "local_blend": [False, True]}})
    kinds = [(c.control, c.options.blend) for c in study.cases]
    # plain generation ignores the edit's options: its two combinations are one case
    assert kinds == [("none", ()), ("p2p", ()), ("p2p", ("square", "triangle"))]
    assert study.cases[0].options == EditOptions()


@pytest.mark.parametrize("data, message", [
    ({"edits": [EDIT], "grid": {"seeds": [1]}}, "unknown name 'seeds'"),
    ({"edits": [EDIT], "options": {"blend_words": ["x"]}}, "unknown name 'blend_words'"),
    ({"edits": [EDIT], "grid": {}}, "the grid is empty"),
    ({"edits": [EDIT], "grid": {"seed": []}}, "factor 'seed' needs a non-empty list"),
    ({"edits": []}, "expected `edits:`"),
    ({"edits": [{"source": "a circle"}]}, "expected `target:`"),
    ({"edits": [EDIT], "grid": {"threshold": [0.3, 1.5]}}, "threshold must be between 0 and 1"),
    ({"edits": [EDIT], "grid": {"steps": [0]}}, "steps must be a whole number"),
    ({"edits": [EDIT], "grid": {"control": ["maybe"]}}, "control must be one of p2p, none"),
    ({"edits": [EDIT], "measures": ["beauty"]}, "measures must be a non-empty list"),
    ({"edits": [EDIT, EDIT]}, "exactly the same settings"),
    ({"edits": [EDIT], "colour": "red"}, "unknown name 'colour'"),
])
def test_bad_studies_get_one_sentence(data, message):
    with pytest.raises(InputError, match=message) as info:
        parse(data)
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no study file"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("edits: [unclosed")
    with pytest.raises(InputError, match="cannot read the study"):
        load(bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must be a mapping"):
        load(tmp_path / "list.json")


def test_examples_load_and_the_demo_study_is_the_demos_pairs():
    """The shipped studies parse; demo_pairs.yaml holds exactly the pairs `p2p demo` measures, three ways each."""
    from prompt2prompt.demo import DemoOptions
    from prompt2prompt.measure import sample_pairs

    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert load(path).cases
    study = load(EXAMPLES / "demo_pairs.yaml")
    demo = DemoOptions()
    pairs = sample_pairs(demo.pairs, seed=1)
    got = {(c.source, c.target, c.generation.seed, c.control, c.options.blend) for c in study.cases}
    want = set()
    for p in pairs:
        want |= {(p.source, p.target, p.seed, "none", ()), (p.source, p.target, p.seed, "p2p", ()),
                 (p.source, p.target, p.seed, "p2p", p.blend)}
    assert got == want and len(study.cases) == 3 * demo.pairs
    assert {(c.generation.steps, c.generation.guidance) for c in study.cases} == {(demo.steps, demo.guidance)}


def test_a_study_over_the_case_limit_is_refused_before_its_cases_are_built(monkeypatch):
    from prompt2prompt import study as study_module

    monkeypatch.setattr(study_module, "MAX_CASES", 10)
    data = {"edits": [{"source": "a red circle", "targets": ["a red square", "a red cross"]}],
            "grid": {"seed": [0, 1, 2], "steps": [1, 2]}}
    with pytest.raises(InputError, match=r"expands to 12 cases \(2 edits x 6 grid combinations\); expected at most 10"):
        parse(data)
    data["grid"]["steps"] = [1]
    assert len(parse(data).cases) == 6
