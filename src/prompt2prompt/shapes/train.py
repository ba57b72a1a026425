"""Train the bundled shapes model from scratch: tokenizer, autoencoder, then UNet and text encoder together.

    python -m prompt2prompt.shapes.train --out runs/shapes          # resumes from runs/shapes/checkpoint.pt

Seeded and resumable: a checkpoint is written every --checkpoint-every steps and at the end of each stage, and a
second run with the same --out carries on where the first stopped. Losses go to `loss.jsonl`. The result is a
standard diffusers `StableDiffusionPipeline` folder in `<out>/pipeline`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import world
from .model import ShapesModelConfig, build_scheduler, build_text_encoder, build_train_scheduler, build_unet, build_vae
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 3000  # autoencoder steps; all but the last vae_full_steps on random 32x32 crops (4x cheaper)
    vae_full_steps: int = 300  # final autoencoder steps on whole 64x64 images, so borders are learnt too
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_object_weight: float = 4.0  # extra loss weight on (saturated) object pixels, so colours come out exact
    kl_weight: float = 1e-6  # SD's autoencoders use a tiny KL term too
    dataset_size: int = 30_000  # scenes encoded once to latents for the diffusion stage
    steps: int = 3500  # UNet + text encoder steps
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # captions dropped to "" so classifier-free guidance works
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023), speeds up convergence
    checkpoint_every: int = 250
    threads: int = 0  # torch threads; 0 keeps torch's default


def _log(out: Path, **row) -> None:
    with (out / "loss.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint


def train_vae(vae, cfg: TrainConfig, out: Path, state: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    start = state.get("vae_step", 0)
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), desc="autoencoder", initial=start, total=cfg.vae_steps)
    for step in bar:
        lr = cfg.vae_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        _, images = world.batch(seed=cfg.seed * 1_000_003 + step, count=cfg.vae_batch)
        x = torch.from_numpy(images)  # (batch, 3, 64, 64) in [-1, 1]
        i, j = np.random.default_rng([cfg.seed, step]).integers(0, x.shape[-1] // 2 + 1, 2)  # per step: resumable
        if step < cfg.vae_steps - cfg.vae_full_steps:
            half = x.shape[-1] // 2
            x = x[:, :, i : i + half, j : j + half]
        saturated = (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values) > 0.3  # object pixels
        weight = 1 + cfg.vae_object_weight * saturated.float()
        posterior = vae.encode(x).latent_dist
        diff = vae.decode(posterior.sample()).sample - x
        rec_loss = (weight * (diff.abs() + diff * diff)).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{rec_loss.item():.5f}")
        if step % 25 == 0:
            _log(out, stage="vae", step=step, loss=rec_loss.item(), kl=kl.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step + 1)
            _save(out / "checkpoint.pt", state)
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, tokenizer, cfg: TrainConfig) -> dict:
    """Encode dataset_size scenes once: latent means and stds (fp16), token ids, and the scaling factor."""
    means, stds, ids = [], [], []
    chunk = 256
    for i in tqdm(range(0, cfg.dataset_size, chunk), desc="encoding scenes"):
        scenes, images = world.batch(seed=cfg.seed * 7_919 + 10_000_000 + i, count=min(chunk, cfg.dataset_size - i))
        dist = vae.encode(torch.from_numpy(images)).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
        ids.append(tokenizer([s.caption for s in scenes], padding="max_length", truncation=True,
                             max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)
    mean = torch.cat(means)
    # SD's scaling factor makes the latents unit-variance (the 0.18215 of SD 1.x was measured the same way).
    scaling = float(1.0 / mean.float().std())
    return {"mean": mean, "std": torch.cat(stds), "ids": torch.cat(ids), "scaling_factor": scaling}


def train_diffusion(unet, text_encoder, data: dict, tokenizer, cfg: TrainConfig, out: Path, state: dict):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
    noise_scheduler = build_train_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    n = data["mean"].shape[0]
    start = state.get("step", 0)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, cfg.steps), desc="diffusion", initial=start, total=cfg.steps)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        latents = data["mean"][idx].float() + data["std"][idx].float() * torch.randn(
            cfg.batch, *data["mean"].shape[1:], generator=g)
        latents = latents * data["scaling_factor"]
        ids = data["ids"][idx].clone()
        drop = torch.rand(cfg.batch, generator=g) < cfg.uncond_prob
        ids[drop] = empty
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        states = text_encoder(ids)[0]
        pred = unet(noisy, t, states).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 25 == 0:
            _log(out, stage="diffusion", step=step, loss=loss.item(), lr=lr)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state.update(unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                         ema=ema, step=step + 1)
            _save(out / "checkpoint.pt", state)
    with torch.no_grad():  # the EMA weights are the model we ship
        for e, p in zip(ema, params):
            p.copy_(e)


def save_pipeline(folder: Path, vae, unet, text_encoder, tokenizer, scaling_factor: float) -> Path:
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shapes", help="run folder: checkpoint, loss log, final pipeline")
    parser.add_argument("--export", default=None, metavar="FOLDER",
                        help="only write the checkpoint's EMA weights as a pipeline to FOLDER (to look at a run "
                        "while it trains), then stop")
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default,
                            help=f"TrainConfig.{field} (default {default})")
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(train_tokenizer(out / "tokenizer"), model_max_length=77)
    model_cfg = replace(ShapesModelConfig(), vocab_size=len(tokenizer), max_length=tokenizer.model_max_length)
    vae, unet, text_encoder = build_vae(model_cfg), build_unet(model_cfg), build_text_encoder(model_cfg)
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else {"config": asdict(cfg)}
    if "vae" in state:
        vae.load_state_dict(state["vae"])
    t0 = time.time()
    if state.get("vae_step", 0) < cfg.vae_steps:
        train_vae(vae, cfg, out, state)
    vae.eval()
    data_path = out / "latents.pt"
    if data_path.exists():
        data = torch.load(data_path)
    else:
        data = encode_dataset(vae, tokenizer, cfg)
        _save(data_path, data)
    if args.export:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        with torch.no_grad():
            for e, p in zip(state["ema"], list(unet.parameters()) + list(text_encoder.parameters())):
                p.copy_(e)
        save_pipeline(Path(args.export), vae, unet, text_encoder, tokenizer, data["scaling_factor"])
        print(f"exported step {state['step']} to {args.export}")
        return
    train_diffusion(unet, text_encoder, data, tokenizer, cfg, out, state)
    folder = save_pipeline(out / "pipeline", vae, unet, text_encoder, tokenizer, data["scaling_factor"])
    print(f"saved {folder} after {(time.time() - t0) / 60:.1f} min this run")


if __name__ == "__main__":
    main()
