"""Resume points: a run's EMA weights in fp16, small enough to commit, from which a lost run restarts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from prompt2prompt.errors import InputError
from prompt2prompt.shapes import points, runs, train

TINY = ["--vae-steps", "2", "--vae-full-steps", "1", "--vae-batch", "2", "--dataset-size", "16", "--batch", "4",
        "--threads", "1", "--milestone-every", "0"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("P2P_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _state(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=False)


def test_a_lost_run_restarts_from_its_point_with_its_weights_step_hours_tokenizer_and_autoencoder(root, tmp_path):
    train.main(["--run", "p", *TINY, "--steps", "3"])
    (root / "p" / "evals.jsonl").write_text(json.dumps({"step": 2, "exact_count": 0.5}) + "\n")
    point = tmp_path / "training" / "p.safetensors"
    train.main(["--run", "p", *TINY, "--steps", "3", "--point", str(point)])
    tensors, meta = points.read_point(point)
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "vae"}  # a tiny autoencoder fits beside
    assert meta["step"] == 3 and meta["typed"] == ["--run", "p", *TINY, "--steps", "3"]
    assert meta["evals"] == [{"step": 2, "exact_count": 0.5}]
    before = _state(root / "p")
    exported = tmp_path / "export"
    train.main(["--run", "p", *TINY, "--steps", "3", "--export", str(exported)])
    ema = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema[k].half(), tensors[f"unet.{k}"]) for k in ema if f"unet.{k}" in tensors)  # the EMA's
    vocab = (root / "p" / "tokenizer" / "vocab.json").read_text()

    shutil.rmtree(root / "p")  # the run folder is lost
    train.main(["--run", "p", *TINY, "--steps", "3", "--restart-from", str(point)])  # restarts, nothing to train
    state = _state(root / "p")
    assert state["step"] == 3 and state["restarts"] == [3] and state["vae_step"] == 2  # no autoencoder stage again
    assert abs(state["seconds"] - before["seconds"]) < 1e-3
    for part in ("unet", "vae"):  # every parameter from the point; buffers as the network builds them
        names = [k[len(part) + 1 :] for k in tensors if k.startswith(part + ".")]
        assert names and all(torch.equal(state[part][k], tensors[f"{part}.{k}"].float()) for k in names)
        assert all(torch.equal(state[part][k], before[part][k]) for k in state[part] if k not in names)
    assert (root / "p" / "tokenizer" / "vocab.json").read_text() == vocab
    assert json.loads((root / "p" / "command.json").read_text())["typed"] == meta["typed"]  # no --restart-from
    assert runs.status(root / "p")["eval"] == {"step": 2, "exact_count": 0.5}  # the evaluations so far come back
    restored = load_file(root / "p" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(restored[k], tensors[f"unet.{k}"].float()) for k in restored if f"unet.{k}" in tensors)

    train.main(["--run", "p", *TINY, "--steps", "5"])  # then it resumes like any run, warming its rate up again
    state = _state(root / "p")
    assert state["step"] == 5 and state["restarts"] == [3] and state["warm_from"] == 3
    lrs = [json.loads(line)["lr"] for line in (root / "p" / "loss.jsonl").read_text().splitlines()]
    assert lrs[-1] < train.TrainConfig().lr * 3 / train.TrainConfig().warmup  # step 4: 2 steps into a new warm-up


def test_a_restart_at_a_milestone_puts_the_milestone_back_and_a_point_exports_like_one(root, tmp_path, capsys):
    """SD3's position table is a buffer, so a point (parameters only) lacks it: the point still exports and
    evaluates (`--export --weights`), and a restart from a point at a milestone's step writes that milestone anew, the
    same bytes as the lost folder's, so `runs evaluate` finds it."""
    args = ["--run", "f", "--family", "sd3", "--vae-from", "shapes", "--text-length", "16", "--dataset-size", "16",
            "--batch", "4", "--transformer-layers", "2", "--zero-tokens", "8", "--threads", "1", "--steps", "2",
            "--milestone-every", "2"]
    train.main(args)
    lost = runs.milestone_path(root / "f", 2)
    lost_weights, lost_info = load_file(lost), runs.milestone_info(lost)
    point = tmp_path / "training" / "f.safetensors"
    train.main([*args, "--point", str(point)])
    tensors, meta = points.read_point(point)
    assert "transformer.pos_embed.pos_embed" in lost_weights and "transformer.pos_embed.pos_embed" not in tensors
    train.main([*args, "--export", str(tmp_path / "exported"), "--weights", str(point)])
    exported = load_file(tmp_path / "exported" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k].half(), lost_weights[f"transformer.{k}"]) for k in exported)

    shutil.rmtree(root / "f")
    train.main([*args, "--restart-from", str(point)])
    back = runs.milestone_path(root / "f", 2)
    assert [s for s, _ in runs.milestones(root / "f")] == [2]
    weights = load_file(back)
    assert weights.keys() == lost_weights.keys() and all(torch.equal(weights[k], lost_weights[k]) for k in weights)
    info = runs.milestone_info(back)
    assert info.pop("hours") == meta["hours"]  # the point's: its checkpoint's, a moment after the milestone's
    assert lost_info.pop("hours") < meta["hours"] and info == lost_info

    from safetensors.torch import save_file  # weights that do not fit: refused by name, nothing written

    save_file({k: v for k, v in tensors.items() if not k.endswith("proj_out.weight")}, tmp_path / "half.safetensors",
              metadata={"step": "2", "config": "{}"})
    with pytest.raises(SystemExit):
        train.main([*args, "--export", str(tmp_path / "x"), "--weights", str(tmp_path / "half.safetensors")])
    assert "--weights: the weights' transformer does not fit this network: missing proj_out.weight" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_restart_is_refused_over_a_checkpoint_or_with_another_recipe(root, tmp_path, capsys):
    train.main(["--run", "q", *TINY, "--steps", "2"])
    point = tmp_path / "q.safetensors"
    train.main(["--run", "q", *TINY, "--steps", "2", "--point", str(point)])
    before = (root / "q" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(["--run", "q", *TINY, "--steps", "4", "--restart-from", str(point)])
    assert "holds a checkpoint (step 2)" in capsys.readouterr().err
    assert (root / "q" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit):
        train.main(["--run", "other", *TINY, "--steps", "4", "--lr", "0.001", "--restart-from", str(point)])
    assert "--lr 0.001 (the point's: 0.0008)" in capsys.readouterr().err
    assert not (root / "other").exists()
    train.main(["--run", "sooner", *TINY, "--steps", "3", "--coverage-from", "2", "--restart-from", str(point)])
    changes = [{"step": 2, "changes": [f"--coverage-from 2 (the point's: {train.TrainConfig().coverage_from})"]}]
    assert _state(root / "sooner")["recipe_changes"] == changes  # its grounding phase starts where the point stands
    (tmp_path / "junk.safetensors").write_bytes(b"not a point")
    with pytest.raises(SystemExit):
        train.main(["--run", "other", *TINY, "--restart-from", str(tmp_path / "junk.safetensors")])
    assert "is not a resume point" in capsys.readouterr().err


def test_an_autoencoder_too_big_to_fit_is_named_by_the_bundled_model_that_has_it_and_checked(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from prompt2prompt import loading

    def vae_of(seed):
        torch.manual_seed(seed)
        return AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)

    nets = {"text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16,
                                                         num_attention_heads=2, num_hidden_layers=1,
                                                         bos_token_id=0, eos_token_id=1, pad_token_id=1))}
    vae, small = vae_of(0), sum(p.numel() * 2 for p in nets["text_encoder"].parameters()) + 1000
    meta = {"step": 7, "hours": 0.1, "config": {}}
    monkeypatch.setattr(loading, "BUNDLED", {})
    with pytest.raises(InputError, match="no bundled model has this run's autoencoder"):
        points.write_point(tmp_path / "x.safetensors", nets, vae, meta, limit=small)
    vae.save_pretrained(tmp_path / "model" / "vae")
    (tmp_path / "model" / "model_index.json").write_text("{}")
    monkeypatch.setattr(loading, "BUNDLED", {"mine": tmp_path / "model"})
    path = points.write_point(tmp_path / "x.safetensors", nets, vae, meta, limit=small)
    tensors, read = points.read_point(path)
    assert read["vae_source"] == "mine" and not any(k.startswith("vae.") for k in tensors)
    other = vae_of(1)
    points.restore(tensors, read, nets, other)
    assert points.digest(other.state_dict()) == points.digest(vae.state_dict())  # the bundled one, loaded
    vae_of(2).save_pretrained(tmp_path / "model" / "vae")  # the bundled model's autoencoder changed since
    with pytest.raises(InputError, match="not the one the run was trained on"):
        points.restore(tensors, read, nets, other)
    with pytest.raises(InputError, match="at most 0 MB"):
        points.write_point(tmp_path / "y.safetensors", nets, vae, meta, vae_from="mine", limit=10)
    assert not (tmp_path / "y.safetensors").exists()


def test_runs_resume_restarts_a_lost_run_from_its_point_and_leaves_a_live_one(root, tmp_path, monkeypatch, capsys):
    started = []

    class Popen:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.pid = 99

    train.main(["--run", "lost", *TINY, "--steps", "2"])
    folder = tmp_path / "training"
    train.main(["--run", "lost", *TINY, "--steps", "2", "--point", str(folder / "lost.safetensors")])
    shutil.copy(folder / "lost.safetensors", folder / "kept.safetensors")
    train.main(["--run", "kept", *TINY, "--steps", "2"])  # a run whose folder is still there
    shutil.rmtree(root / "lost")
    monkeypatch.setattr(runs.subprocess, "Popen", Popen)
    assert runs.main(["resume", "--points", str(folder)]) == 0
    assert len(started) == 1  # "kept" is finished and has its checkpoint: no restart, no resume
    argv = started[0]
    assert argv[argv.index("--run") + 1] == "lost" and argv.count("--run") == 1
    assert argv[-2:] == ["--restart-from", str((folder / "lost.safetensors").resolve())]
    assert argv[argv.index("--steps") + 1] == "2" and "--vae-steps" in argv
    assert "lost: restarted from" in capsys.readouterr().out
