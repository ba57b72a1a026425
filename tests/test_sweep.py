"""`p2p sweep` on the bundled model: outputs and measures, resuming, failures, word checks, 1 versus 2 processes."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from prompt2prompt import sweep as sweep_module
from prompt2prompt.cli import main
from prompt2prompt.edits import edit
from prompt2prompt.errors import InputError
from prompt2prompt.study import parse
from prompt2prompt.sweep import case_folder, run_sweep

STUDY = {
    "name": "test study",
    "model": "shapes",
    "generation": {"steps": 3},
    "edits": [
        {"source": "a red circle and a blue square", "target": "a red circle and a blue triangle",
         "options": {"blend": ["square", "triangle"]}},
        {"source": "a green cross", "target": "a yellow cross"},
    ],
    "grid": {"seed": [0, 1], "control": ["none", "p2p"]},
}




def test_a_sweep_writes_every_case_the_tables_and_the_sheet(shapes, tmp_path):
    study = parse(STUDY)
    out = tmp_path / "out"
    counts = run_sweep(study, out, pipe=shapes, progress=False)
    assert counts == {"computed": 8, "skipped": 0, "failed": 0, "complete": True}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and [r["id"] for r in rows] == [c.id for c in study.cases]
    assert {r["seed"] for r in rows} == {"0", "1"} and {r["control"] for r in rows} == {"none", "p2p"}
    jsonl = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [r["id"] for r in jsonl] == [c.id for c in study.cases]
    for case, record in zip(study.cases, jsonl):
        m = record["measures"]
        assert record["status"] == "ok" and m["latent_drift"] > 0
        assert (case_folder(out, case) / "source.png").exists() and (case_folder(out, case) / "target.png").exists()
        two_objects = case.source.count(" and ")
        assert ("keep_iou" in m) == bool(two_objects)  # the world's truth where one object of two changes
        assert ("blend_mask_area" in m) == bool(case.options.blend)  # blend measures where a blend ran
        if "blend_mask_area" in m:
            assert 0 < m["blend_mask_area"] < 1 and m["psnr_outside_mask"] > 20
    # the sweep computes what the library computes: the case's pictures are edit()'s, bit for bit
    case = next(c for c in study.cases if c.control == "p2p" and c.options.blend)
    r = edit(shapes, case.source, case.target, case.options, case.generation, vanilla=False, progress=False)
    saved = np.asarray(Image.open(case_folder(out, case) / "target.png"))
    assert np.array_equal(saved, np.asarray(r.controlled.images[1]))
    page = (out / "index.html").read_text()
    assert page.count("<tr><td><img") == 8 and "onclick='sortBy(this)'" in page
    assert "<h2>seed</h2>" in page and "<h2>control</h2>" in page  # a picture grid per factor
    assert not list((out / "cases").glob(".*"))  # no half-written case left


def test_the_sheets_grids_show_each_rows_source_and_name_its_edit(shapes, tmp_path, monkeypatch):
    from prompt2prompt import plot

    study = parse(STUDY)
    out = tmp_path / "out"
    run_sweep(study, out, pipe=shapes, progress=False)
    drawn = {}
    real = plot.grid
    monkeypatch.setattr(plot, "grid", lambda images, labels, **kw: drawn.setdefault(kw["title"].split(":")[0], (
        images, labels, kw)) and real(images, labels, **kw))
    sweep_module.factor_grids(study, out, sweep_module.records(study, out))
    images, labels, kw = drawn["control"]  # not a generation setting: one source per row, first
    assert kw["columns"] == 3 and labels[:3] == ["source", "control=none", "control=p2p"]
    assert kw["row_labels"] == ["square->triangle; seed=0", "square->triangle; seed=1", "green->yellow; seed=0",
                                "green->yellow; seed=1"]
    first = next(c for c in study.cases if c.factors == {"seed": 0, "control": "none"})
    assert np.array_equal(np.asarray(images[0]), np.asarray(Image.open(case_folder(out, first) / "source.png")))
    images, labels, kw = drawn["seed"]  # the source changes with the seed: a row of sources above the edits
    assert kw["columns"] == 2 and labels[:4] == ["source, seed=0", "source, seed=1", "seed=0", "seed=1"]
    assert kw["row_labels"][:2] == ["square->triangle; control=none: source", "square->triangle; control=none: edit"]
    page = (out / "index.html").read_text()
    assert "<div class='wide'><table id='cases'>" in page  # the table scrolls inside the page, not past it


@pytest.mark.parametrize("source, target, name", [
    ("a red circle", "a red square", "circle->square"),
    ("a circle and a square", "a green circle and a blue square", "+green +blue"),
    ("a red circle", "a red circle", "same prompt"),
    ("a big red circle", "a circle", "-big -red"),
])
def test_edit_names(source, target, name):
    assert sweep_module.edit_name(source, target) == name


def test_an_interrupted_sweep_finishes_with_every_case_once(shapes, tmp_path, monkeypatch):
    study = parse(STUDY)
    out = tmp_path / "out"
    computed = []
    real = sweep_module.run_case

    def counting(pipe, case):
        if len(computed) == 3:  # killed in the middle of the fourth case
            raise KeyboardInterrupt
        computed.append(case.id)
        return real(pipe, case)

    monkeypatch.setattr(sweep_module, "run_case", counting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(study, out, pipe=shapes, progress=False)
    assert len(list((out / "cases").iterdir())) == 3 and not (out / "results.csv").exists()
    monkeypatch.setattr(sweep_module, "run_case", lambda pipe, case: (computed.append(case.id), real(pipe, case))[1])
    counts = run_sweep(study, out, pipe=shapes, progress=False)
    assert counts["computed"] == 5 and counts["skipped"] == 3 and counts["complete"]
    assert sorted(computed) == sorted(c.id for c in study.cases)  # every case exactly once over both runs
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 8
    assert run_sweep(study, out, pipe=shapes, progress=False)["computed"] == 0  # a third run has nothing to do


def test_a_failing_case_is_recorded_and_the_sweep_goes_on(shapes, tmp_path, monkeypatch):
    study = parse({**STUDY, "grid": {"seed": [0, 1]}})
    out = tmp_path / "out"
    real = sweep_module.run_case
    bad = study.cases[1].id

    def flaky(pipe, case):
        if case.id == bad:
            raise RuntimeError("out of memory, say")
        return real(pipe, case)

    monkeypatch.setattr(sweep_module, "run_case", flaky)
    counts = run_sweep(study, out, pipe=shapes, progress=False)
    assert counts["failed"] == 1 and counts["complete"]
    rows = {r["id"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows[bad]["status"] == "error" and "out of memory, say" in rows[bad]["error"]
    assert all(r["status"] == "ok" for i, r in rows.items() if i != bad)
    monkeypatch.setattr(sweep_module, "run_case", real)
    assert run_sweep(study, out, pipe=shapes, progress=False)["computed"] == 0  # failures are kept
    again = run_sweep(study, out, pipe=shapes, progress=False, retry_failed=True)
    assert again["computed"] == 1 and again["failed"] == 0
    assert json.loads((case_folder(out, study.cases[1]) / "case.json").read_text())["status"] == "ok"


def test_words_and_folders_are_checked_before_any_case(shapes, tmp_path):
    study = parse({**STUDY, "edits": [{**STUDY["edits"][0], "options": {"blend": ["hexagon"]}}]})
    out = tmp_path / "out"
    with pytest.raises(InputError, match="'hexagon'"):
        run_sweep(study, out, pipe=shapes, progress=False)
    assert not out.exists()  # nothing is created before the study is accepted
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(InputError, match=r"did not write \(thesis.tex\)"):
        run_sweep(parse(STUDY), foreign, pipe=shapes, progress=False)


def test_a_process_starting_beside_another_sees_its_folder_as_the_sweeps(shapes, tmp_path, monkeypatch):
    """The processes of one sweep check the folder as they start, while the first may already be writing: its
    writability probe and lock are not foreign files, and a sweep's file never appears before its marker."""
    from prompt2prompt.outputs import PROBE

    out = tmp_path / "out"
    out.mkdir()
    (out / sweep_module.LOCK).touch()
    (out / f"{PROBE}x1y2").touch()  # another process's probe, caught between its creation and removal
    assert sweep_module.check_sweep_folder(out) == out
    (out / "cases").mkdir()
    with pytest.raises(InputError, match=r"did not write \(cases\)"):
        sweep_module.check_sweep_folder(out)
    (out / sweep_module.MARKER).touch()
    assert sweep_module.check_sweep_folder(out) == out
    fresh, seen = tmp_path / "fresh", []
    real_mkdir = type(out).mkdir

    def mkdir(self, *args, **kwargs):  # what a starting process would see as each folder of the sweep appears
        if self.parent == fresh:
            seen.append((self.name, (fresh / sweep_module.MARKER).exists()))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(out), "mkdir", mkdir)
    run_sweep(parse(STUDY), fresh, pipe=shapes, progress=False)
    assert seen and all(marked for _, marked in seen), seen


def test_two_processes_through_accelerate_equal_one(shapes, tmp_path, capsys):
    """`p2p sweep --processes 2` (accelerate launch, 2 CPU processes) gives the table and, bit for bit, the pictures
    of one process with the same thread count."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({**STUDY, "grid": {"seed": [0, 1, 2]}}))
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "prompt2prompt.sweep", str(study_file), "--out", str(one), "--threads", "1",
                    "--quiet"], check=True)
    assert main(["sweep", str(study_file), "--out", str(two), "--processes", "2", "--threads", "1", "--quiet"]) == 0

    def table(folder):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(folder / "results.csv"))]

    assert table(one) == table(two) and len(table(one)) == 6
    for case_dir in (one / "cases").iterdir():
        for name in ("source.png", "target.png"):
            a = np.asarray(Image.open(case_dir / name))
            b = np.asarray(Image.open(two / "cases" / case_dir.name / name))
            assert np.array_equal(a, b)


def test_bad_study_from_the_command_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"edits": [STUDY["edits"][0]], "grid": {"seeds": [1]}}))
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown name 'seeds'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
