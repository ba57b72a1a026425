"""The training script's parts: which tokens name which object, the latent-size masks, the grounding loss, a run."""

import json
import math
import random

import numpy as np
import pytest
import torch

from prompt2prompt.shapes import world
from prompt2prompt.shapes.train import Grounding, latent_masks, main, object_tokens


@pytest.mark.parametrize("caption, words", [
    ("a red circle and a blue square", {"red": 0, "circle": 0, "blue": 1, "square": 1}),
    ("an orange cross", {"orange": 0, "cross": 0}),
    ("a circle and an orange triangle", {"circle": 0, "orange": 1, "triangle": 1}),
])
def test_object_tokens_line_up_with_the_tokenizer(tokenizer, caption, words):
    owner = object_tokens(tokenizer, caption)
    ids = tokenizer(caption).input_ids
    assert len(owner) == len(ids) - 1  # every position but the end token
    vocab = {v: k.removesuffix("</w>") for k, v in tokenizer.get_vocab().items()}
    named = {vocab[i]: o for i, o in zip(ids, owner) if o >= 0}
    assert named == words
    assert all(o == -1 for i, o in zip(ids, owner) if vocab[i] in ("a", "an", "and") or i == ids[0])


@pytest.mark.parametrize("objects", [1, 2, 3])
def test_latent_masks_are_the_area_share_of_each_object(objects):
    rng = random.Random(4)
    scene = next(s for s in iter(lambda: world.sample_scene(rng, three_objects=0.3), None) if len(s.objects) == objects)
    masks = latent_masks(scene, 16)
    assert masks.shape == (3, 16, 16)
    true = scene.masks()
    for k in range(len(true)):
        assert masks[k].sum() * 16 == pytest.approx(true[k].sum(), rel=1e-5)  # each cell is 4x4 = 16 pixels
        assert masks[k].sum() > 0
    assert (masks[len(true):] == 0).all()


def test_grounding_loss_is_zero_on_the_object_and_ignores_other_tokens():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: the top-left quarter
    owner = torch.tensor([[-1, 0, -1]])  # only token 1 names an object
    on = torch.zeros(1, 2, 16, 3)
    on[..., 0] = 1
    on[0, :, [0, 1, 4, 5], 1] = 0.5  # token 1's attention lies only on the object's four pixels
    g = Grounding()
    g.probs.append(on)
    token, pixel = g.loss(owner, masks)
    assert token.item() == pytest.approx(0.0)
    assert g.probs == []  # the layers' probabilities are released after each step
    g.probs.append(torch.full((1, 2, 16, 3), 1 / 3))  # uniform: a quarter of it on the object
    assert g.loss(owner, masks)[0].item() == pytest.approx(0.75**2)
    full = on.clone()
    full[0, :, [0, 1, 4, 5], 1] = 1.0  # all of those pixels' attention on token 1: the pixel loss is ~0 too
    g.probs.append(full)
    token, pixel = g.loss(owner, masks)
    assert token.item() == pytest.approx(0.0) and pixel.item() < 1e-4
    g.probs.append(on)  # half of it: the pixel loss says the object is only half covered
    assert g.loss(owner, masks)[1].item() == pytest.approx(4 / 16 * -math.log(0.5), rel=1e-4)


@pytest.mark.parametrize("bias", [0.0, 1.0, 3.0])
def test_timestep_bias_moves_training_towards_the_noisy_steps(bias):
    from prompt2prompt.shapes.train import draw_timesteps

    t = draw_timesteps(200_000, 1000, bias, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 999
    assert (t >= 500).float().mean().item() == pytest.approx(0.5 ** (1 / (1 + bias)), abs=0.005)
    g = torch.Generator().manual_seed(3)  # bias 0 is the plain uniform draw, so older runs are reproduced
    assert torch.equal(draw_timesteps(8, 1000, 0.0, g), torch.randint(0, 1000, (8,),
                                                                        generator=torch.Generator().manual_seed(3)))


def test_training_runs_resumes_and_writes_a_pipeline(tmp_path):
    args = ["--out", str(tmp_path), "--vae-steps", "2", "--vae-full-steps", "1", "--vae-batch", "2",
            "--dataset-size", "16", "--batch", "4", "--checkpoint-every", "1", "--coverage-weight", "0.1"]
    main([*args, "--steps", "1"])
    main([*args, "--steps", "2"])  # carries on from step 1
    rows = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    diffusion = [r for r in rows if r["stage"] == "diffusion"]
    assert [(r["step"], r["steps"]) for r in diffusion] == [(0, 1), (1, 1)]  # each run's last step logged, its mean
    assert np.isfinite([r[k] for r in rows if r["stage"] == "diffusion" for k in ("grounding", "coverage")]).all()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    assert pipe.vae.config.scaling_factor > 0 and pipe.tokenizer.model_max_length == 77
    assert (tmp_path / "pipeline" / "tokenizer" / "vocab.json").exists()  # CLIP's own files, as the issue asks
    assert (tmp_path / "pipeline" / "tokenizer" / "merges.txt").exists()


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed right after its 3rd checkpoint (inside the autoencoder stage) and started again with the same command,
    a run ends at exactly the weights of one uninterrupted run."""
    from safetensors.torch import load_file

    from prompt2prompt.shapes import train

    args = ["--vae-steps", "3", "--vae-full-steps", "1", "--vae-batch", "2", "--dataset-size", "16", "--batch", "4",
            "--checkpoint-every", "1", "--steps", "3", "--two-objects", "0.75", "--margin", "6"]
    main(["--out", str(tmp_path / "whole"), *args])
    save, saves = train._save, []

    def dying(path, state):
        save(path, state)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if the machine stopped here

    monkeypatch.setattr(train, "_save", dying)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(tmp_path / "cut"), *args])
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["vae_step"] == 2
    monkeypatch.setattr(train, "_save", save)
    main(["--out", str(tmp_path / "cut"), *args])
    for part in ("unet", "vae", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a = load_file(tmp_path / "whole" / "pipeline" / part / name)
        b = load_file(tmp_path / "cut" / "pipeline" / part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_flow_model_trains_resumes_and_loads_with_plain_diffusers(tmp_path):
    """--family sd3: the bundled autoencoder reused, an MM-DiT trained by flow matching with the grounding losses on
    its joint attention, saved as a StableDiffusion3Pipeline without T5 that plain diffusers loads and samples."""
    from diffusers import StableDiffusion3Pipeline

    from prompt2prompt.loading import family, load_pipeline

    args = ["--out", str(tmp_path), "--family", "sd3", "--vae-from", "shapes", "--text-length", "16",
            "--dataset-size", "16", "--batch", "4", "--checkpoint-every", "1", "--transformer-layers", "2",
            "--zero-tokens", "8", "--coverage-weight", "0.1", "--coverage-from", "0"]
    main([*args, "--steps", "1"])
    main([*args, "--steps", "2"])  # carries on from step 1
    rows = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"diffusion"}  # no autoencoder stage: it was reused
    from prompt2prompt.loading import resolve

    for part in ("vae", "tokenizer"):  # copied into the run: a resume reads them, whatever `shapes` is by then
        for f in (resolve("shapes") / part).iterdir():
            assert (tmp_path / part / f.name).read_bytes() == f.read_bytes()
    assert np.isfinite([r[k] for r in rows for k in ("loss", "grounding", "coverage")]).all()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    # SD3 without T5 loads as diffusers documents it: the absent encoder named as None
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipeline", text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    assert family(pipe) == "sd3" and pipe.text_encoder_3 is None and pipe.tokenizer.model_max_length == 16
    assert pipe.vae.config.shift_factor is not None and pipe.vae.config.scaling_factor > 0
    assert pipe.transformer.config.joint_attention_dim == 2 * pipe.text_encoder.config.hidden_size
    out = pipe("a red circle", num_inference_steps=2, max_sequence_length=4, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    mine = load_pipeline(tmp_path / "pipeline")  # the library's loader knows it too
    assert mine.text_encoder_3 is None and type(mine.transformer) is type(pipe.transformer)


def test_zero_terminal_snr_trains_v_prediction_and_samples_from_pure_noise(tmp_path):
    """--zero-snr: the schedule's last step carries no trace of the image (Lin et al. 2024), the UNet predicts v, and
    the saved pipeline samples with trailing timesteps, so its first step is that last one."""
    from diffusers import StableDiffusionPipeline

    args = ["--out", str(tmp_path), "--vae-steps", "1", "--vae-full-steps", "1", "--vae-batch", "2",
            "--dataset-size", "16", "--batch", "8", "--steps", "1", "--prediction", "v_prediction",
            "--zero-snr", "true"]
    main(args)
    row = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()][-1]
    assert row["stage"] == "diffusion" and np.isfinite(row["loss"])  # no 0/0 from the zero SNR in the weighting
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert pipe.scheduler.alphas_cumprod[-1] == 0
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    out = pipe("a red circle", num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    with pytest.raises(SystemExit):  # zero SNR with epsilon prediction: nothing to learn at the last step
        main(["--out", str(tmp_path / "eps"), "--zero-snr", "true"])
    assert not (tmp_path / "eps").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:7"])  # not a device type; an ordinal no test machine has
def test_a_device_the_machine_lacks_is_refused_before_anything_is_written(tmp_path, capsys, device):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--device", device])
    err = capsys.readouterr().err
    assert "--device: " in err and repr(device) in err
    assert "expected cpu" in err or "cuda:0.." in err  # what the machine has: no GPU, or the GPUs it has
    assert not (tmp_path / "run").exists()


def test_grounding_loss_over_layers_of_several_sizes_is_the_mean_of_each_layers_loss():
    """Layers of one map size are computed together; the result is still the plain mean over layers."""
    g = torch.Generator().manual_seed(0)
    owner = torch.tensor([[-1, 0, 0, -1, 1], [-1, 1, -1, -1, -1]])
    masks = torch.rand(2, 3, 8, 8, generator=g).round()
    layers = [torch.rand(2, 2, side * side, 5, generator=g).softmax(-1) for side in (8, 4, 8, 2, 4)]
    each = []
    for probs in layers:
        one = Grounding()
        one.probs.append(probs)
        each.append(one.loss(owner, masks))
    together = Grounding()
    together.probs.extend(layers)
    token, pixel = together.loss(owner, masks)
    assert token.item() == pytest.approx(np.mean([t.item() for t, _ in each]), rel=1e-5)
    assert pixel.item() == pytest.approx(np.mean([p.item() for _, p in each]), rel=1e-5)


def test_sd3_prompt_encoding_from_ids_is_the_pipelines_own(tokenizer):
    """The trainer encodes SD3 captions from their token ids; the pipeline's encode_prompt gives the same tensors."""
    from prompt2prompt.shapes.model import ShapesModelConfig, build_text_encoder, build_transformer
    from prompt2prompt.shapes.train import sd3_pipeline, sd3_prompt_embeds

    torch.manual_seed(0)
    cfg = ShapesModelConfig(vocab_size=len(tokenizer), max_length=tokenizer.model_max_length, transformer_layers=1)
    nets = {"transformer": build_transformer(cfg), "text_encoder": build_text_encoder(cfg, projection=True),
            "text_encoder_2": build_text_encoder(cfg, projection=True)}
    pipe = sd3_pipeline(nets, None, tokenizer)
    captions = ["a red circle and a blue square", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=5)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    mine, mine_pooled = sd3_prompt_embeds(nets, ids, 5)
    assert mine.shape == embeds.shape == (2, tokenizer.model_max_length + 5, 2 * cfg.text_width)
    assert torch.equal(mine, embeds) and torch.equal(mine_pooled, pooled)
