"""Training runs that outlive a session: the runs root, replayed commands, recipe checks, milestones, the clock."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from prompt2prompt.shapes import runs, train

TINY = ["--vae-steps", "2", "--vae-full-steps", "1", "--vae-batch", "2", "--dataset-size", "16", "--batch", "4",
        "--threads", "1"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("P2P_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def test_a_named_run_lives_under_the_runs_root_and_records_the_command_that_resumes_it(root):
    train.main(["--run", "tiny", *TINY, "--steps", "2"])
    folder = root / "tiny"
    command = json.loads((folder / "command.json").read_text())
    assert command["typed"] == ["--run", "tiny", *TINY, "--steps", "2"]
    argv = command["argv"]
    assert argv[:2] == ["--out", str(folder.resolve())]  # an absolute folder: resumable from any current folder
    spelt = dict(zip(argv[::2], argv[1::2]))  # every setting written out, so a later default cannot change the run
    assert spelt["--batch"] == "4" and spelt["--lr"] == str(train.TrainConfig().lr) and spelt["--zero-snr"] == "false"
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["step"] == 2
    assert runs.status(folder)["finished"] and runs.resume(folder) is None  # nothing left to do
    assert not (folder / "train.pid").exists()  # the lock goes with the trainer


def test_the_default_run_names_and_a_bad_name(root, capsys):
    with pytest.raises(SystemExit):
        train.main(["--run", "../elsewhere", *TINY])
    assert "--run: a run's name is one folder name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--run", "a", "--out", str(root / "b"), *TINY])
    assert "name the run's folder twice" in capsys.readouterr().err
    assert not root.exists()


def test_resuming_with_another_recipe_is_refused_and_changes_nothing(root, capsys):
    train.main(["--run", "r", *TINY, "--steps", "1"])
    before = (root / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(["--run", "r", *TINY, "--steps", "2", "--lr", "0.001"])
    err = capsys.readouterr().err
    assert "another recipe" in err and "--lr 0.001 (was 0.0008)" in err
    assert (root / "r" / "checkpoint.pt").read_bytes() == before
    train.main(["--run", "r", *TINY, "--steps", "2", "--threads", "2", "--checkpoint-every", "5"])  # free settings
    assert torch.load(root / "r" / "checkpoint.pt", weights_only=False)["step"] == 2


def test_the_pixel_grounding_phase_may_move_while_the_run_has_reached_neither_start(root, capsys):
    train.main(["--run", "c", *TINY, "--steps", "2", "--coverage-from", "10"])
    with pytest.raises(SystemExit):  # to a step the run has passed: its steps so far would not be that recipe's
        train.main(["--run", "c", *TINY, "--steps", "4", "--coverage-from", "1"])
    assert "another recipe" in capsys.readouterr().err
    train.main(["--run", "c", *TINY, "--steps", "4", "--coverage-from", "2"])  # from the step it stands at
    assert "the recipe changes from step 2: --coverage-from 2 (was 10)" in capsys.readouterr().out
    state = torch.load(root / "c" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["recipe"]["coverage_from"] == 2
    assert state["recipe_changes"] == [{"step": 2, "changes": ["--coverage-from 2 (was 10)"]}]
    command = json.loads((root / "c" / "command.json").read_text())
    assert command["typed"] == ["--run", "c", *TINY, "--steps", "4", "--coverage-from", "2"]  # what resumes it now
    assert command["argv"][command["argv"].index("--coverage-from") + 1] == "2"
    with pytest.raises(SystemExit):  # back again, once passed: refused, nothing changed
        train.main(["--run", "c", *TINY, "--steps", "6", "--coverage-from", "10"])
    assert "--coverage-from 10 (was 2)" in capsys.readouterr().err
    assert torch.load(root / "c" / "checkpoint.pt", weights_only=False)["step"] == 4


def test_a_second_trainer_on_a_folder_in_use_is_refused(root, capsys):
    folder = root / "busy"
    folder.mkdir(parents=True)
    (folder / "train.pid").write_text(str(runs.os.getppid()))  # a live process that is not this one
    with pytest.raises(SystemExit):
        train.main(["--run", "busy", *TINY, "--steps", "1"])
    assert "another trainer" in capsys.readouterr().err
    assert not (folder / "checkpoint.pt").exists()


def test_the_clock_adds_up_over_sessions_and_checkpoints_come_by_time_too(root, monkeypatch):
    saves = []
    save = train._save
    monkeypatch.setattr(train, "_save", lambda path, state: (saves.append(state.get("step")), save(path, state)))
    # checkpoints every 1,000 steps by count, but every step by time (0 minutes): each step is kept
    train.main(["--run", "c", *TINY, "--steps", "3", "--checkpoint-every", "1000", "--checkpoint-minutes", "0"])
    assert [s for s in saves if s is not None] == [1, 2, 3]  # each step by time (by count: only the last)
    first = torch.load(root / "c" / "checkpoint.pt", weights_only=False)["seconds"]
    train.main(["--run", "c", *TINY, "--steps", "5", "--checkpoint-every", "1000", "--checkpoint-minutes", "0"])
    second = torch.load(root / "c" / "checkpoint.pt", weights_only=False)["seconds"]
    assert 0 < first < second  # the second session's time is added to the first's
    rows = [json.loads(line) for line in (root / "c" / "loss.jsonl").read_text().splitlines()]
    hours = [r["hours"] for r in rows if r["stage"] == "diffusion"]
    assert hours == sorted(hours) and hours[-1] * 3600 <= second + 1e-6


def test_milestones_hold_the_ema_weights_in_fp16_and_export_as_the_checkpoint_does(root, tmp_path):
    train.main(["--run", "m", *TINY, "--steps", "4", "--milestone-every", "2"])
    folder = root / "m"
    assert [s for s, _ in runs.milestones(folder)] == [2, 4]
    path = runs.milestone_path(folder, 4)
    info = runs.milestone_info(path)
    assert info["step"] == 4 and info["config"]["batch"] == 4 and 0 < info["hours"] < 1
    assert info["scaling_factor"] > 0
    weights = load_file(path)
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "vae"}
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    # the milestone at the last step is the EMA the trainer shipped in pipeline/, rounded to fp16
    shipped = load_file(folder / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in shipped.items():
        assert torch.equal(weights["unet." + key], value.half()), key
    # ... and the training weights were put back after writing it: the run goes on from them, not from the EMA
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert not all(torch.equal(state["unet"][k].half(), weights["unet." + k]) for k in state["unet"])
    train.main(["--run", "m", *TINY, "--steps", "4", "--export", str(tmp_path / "exported"), "--weights", str(path)])
    from prompt2prompt.loading import load_pipeline

    pipe = load_pipeline(tmp_path / "exported")
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, weights["unet." + key].float()), key
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])


def test_runs_status_resume_and_row(root, capsys):
    import time

    train.main(["--run", "s", *TINY, "--steps", "1"])
    command = json.loads((root / "s" / "command.json").read_text())
    spelt = command["argv"]
    spelt[spelt.index("--steps") + 1] = "2"  # as if the run had been started for 2 steps and stopped after 1
    (root / "s" / "command.json").write_text(json.dumps(command))
    assert runs.main([]) == 0
    assert "s: stopped, diffusion step 1 of 2" in capsys.readouterr().out
    (root / "s" / "train.pid").write_text(str(runs.os.getppid()))  # a live trainer holds the folder
    assert runs.status(root / "s")["running"] and runs.resume(root / "s") is None
    (root / "s" / "train.pid").unlink()
    assert runs.resume(root / "s", python=sys.executable)  # in the background, with the recorded arguments
    deadline = time.time() + 120
    while not runs.status(root / "s")["finished"] and time.time() < deadline:
        time.sleep(0.5)
    assert runs.status(root / "s")["step"] == 2
    assert "== resumed" in (root / "s" / "train.log").read_text()
    row = runs.progress_row(root / "s")
    assert row.startswith("| s | `python -m prompt2prompt.shapes.train --run s") and "| 2 |" in row


def test_a_milestone_is_evaluated_and_shipped_as_a_first_improvement(root, tmp_path, monkeypatch):
    from prompt2prompt.shapes import ship as ship_module

    train.main(["--run", "e", *TINY, "--steps", "2", "--milestone-every", "2"])
    row = runs.evaluate(root / "e", count=2)
    assert row["step"] == 2 and row["count"] == 2 and row["guidance"] == 7.5 and "exact_count_two" in row
    saved = json.loads((root / "e" / "evals.jsonl").read_text().splitlines()[-1])
    assert json.dumps(saved) == json.dumps(row)  # (NaN where two captions name no one-object scene)
    evaluation = root / "e" / "milestones" / "step-000002.eval.json"
    assert json.loads(evaluation.read_text())["count"] == 2
    worse = {k: row[k] - 1 for k in ship_module.IMPROVED}  # a shipped model worse on every measure
    (tmp_path / "shipped.json").write_text(json.dumps(worse))
    monkeypatch.setitem(ship_module.BUNDLED, "shapes", tmp_path / "package" / "shapes")
    ship_module.main([str(root / "e"), "--step", "2", "--eval", str(evaluation), "--over",
                      str(tmp_path / "shipped.json")])
    shipped = load_file(tmp_path / "package" / "shapes" / "unet" / "diffusion_pytorch_model.safetensors")
    exported = load_file(root / "e" / "milestones" / "step-000002" / "unet" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == exported.keys() and all(torch.equal(shipped[k], exported[k]) for k in shipped)
