"""The mutation run (`tests/mutants.py`) stays alive: every mutant's text is in the code exactly once, so each one can
still be applied, and a stale one is reported without ending the run."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("mutants", Path(__file__).with_name("mutants.py"))
mutants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_every_mutants_text_is_in_the_code_exactly_once(name):
    assert mutants.stale(name) == "", f"{name}: {mutants.stale(name)}"
    file, old, new, tests = mutants.MUTANTS[name]
    assert old != new and tests
    for test in tests:  # the tests it names exist
        path = mutants.ROOT / test.split("::")[0]
        assert path.exists(), test
        if "::" in test:
            assert f"def {test.split('::')[1]}(" in path.read_text(), test


def test_a_stale_mutant_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    monkeypatch.setitem(mutants.MUTANTS, "gone", ("joint.py", "a text no code holds", "x", ["tests/test_joint.py"]))
    ran = []
    monkeypatch.setattr(mutants, "FAST", ("gone", "other"))
    real = mutants.run
    monkeypatch.setattr(mutants, "run", lambda name: ran.append(name) or (real(name) if name == "gone" else True))
    assert mutants.main(["--fast"]) == 1  # a stale mutant is a failure of the run ...
    assert ran == ["gone", "other"]  # ... but the mutants after it still run
    out = capsys.readouterr().out
    assert "gone" in out and "STALE" in out and "1 of 2 mistakes caught" in out
