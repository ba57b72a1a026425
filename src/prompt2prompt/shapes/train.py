"""Train the bundled shapes models from scratch: tokenizer, autoencoder, then denoiser and text encoders together.

    python -m prompt2prompt.shapes.train --run shapes               # `shapes`: SD 1.x's UNet, DDPM noise
    python -m prompt2prompt.shapes.train --run shapes-flow --family sd3 --vae-from shapes --text-length 16
                                                                    # `shapes-flow`: SD3's MM-DiT, flow matching

Seeded and resumable: a checkpoint is written every --checkpoint-every steps (and at least every --checkpoint-minutes)
and at the end of each stage, and the same command run again carries on where the last one stopped. `--run NAME`
trains in `$P2P_RUNS/NAME` (default `~/.cache/prompt2prompt/runs/NAME`, outside any checkout, so a run outlives the
session that started it: `python -m prompt2prompt.shapes.runs` lists runs and resumes them); `--out FOLDER` in any
other folder. A resumed run must have the recipe it was started with (only --steps, --threads, --device and the
checkpoint and milestone intervals may change). Losses go to `loss.jsonl` (with the hours trained so far), the EMA
weights every --milestone-every steps to `milestones/step-N.safetensors` (fp16, with the step, hours and recipe).
The result is a standard diffusers `StableDiffusionPipeline` folder in `<out>/pipeline`. `--device cuda` trains on a
GPU: every random draw (scenes, noise, timesteps, dropped captions) is still made on the CPU, so a run sees the same
data on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..attention import AttentionController, Site, control
from ..errors import P2PError
from . import world
from .model import (
    ShapesModelConfig,
    build_flow_scheduler,
    build_scheduler,
    build_text_encoder,
    build_train_scheduler,
    build_transformer,
    build_unet,
    build_vae,
)
from .optim import EMA, FlatParameters, adamw
from .runs import milestone_path, run_folder, runs_root
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    family: str = "sd1"  # sd1: SD 1.x's UNet, DDPM noise (shapes); sd3: SD3's MM-DiT, flow matching (shapes-flow)
    vae_from: str = ""  # a pipeline folder or bundled name whose autoencoder and tokenizer are reused (no autoencoder
    # stage); "" trains both
    text_length: int = 77  # tokenizer.model_max_length: text tokens per caption (the world's longest caption has 10)
    zero_tokens: int = 256  # sd3 without T5: the pipeline appends max_sequence_length zero tokens (256 by default);
    # training draws their number log-uniformly from 1 up to (not including) this, so any length works at inference
    vae_steps: int = 3000  # autoencoder steps; all but the last vae_full_steps on random 32x32 crops (4x cheaper)
    vae_full_steps: int = 300  # final autoencoder steps on whole 64x64 images, so borders are learnt too
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_object_weight: float = 4.0  # extra loss weight on (saturated) object pixels, so colours come out exact
    vae_edge_weight: float = 0.0  # extra loss weight on pixels next to a colour boundary (both sides of an edge)
    kl_weight: float = 1e-6  # SD's autoencoders use a tiny KL term too
    dataset_size: int = 40_000  # scenes encoded once to latents for the diffusion stage
    two_objects: float = 0.6  # share of two-object scenes in the training data
    three_objects: float = 0.0  # share of three-object scenes: contrast data, so that guidance learns a two-object
    # caption rules a third object out (the evaluator's captions name one or two)
    margin: float = 2.0  # pixels between two objects' bounding boxes, at least
    steps: int = 9_200  # UNet + text encoder steps
    batch: int = 32  # measured on 2 CPU cores: 93 samples/s at 32, 73 at 64 (and 0.34 s vs 0.88 s a step)
    lr: float = 8e-4
    warmup: int = 300
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # captions dropped to "" so classifier-free guidance works
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023), speeds up convergence
    prediction: str = "epsilon"  # sd1: what the UNet predicts, epsilon (SD 1.x) or v_prediction (SD 2.x)
    zero_snr: bool = False  # sd1: noise schedule rescaled to zero terminal SNR, sampled from its last step (Lin et
    # al. 2024): training then never shows the UNet a trace of the image at the noisiest step. Needs v_prediction
    timestep_bias: float = 0.0  # sd1: t = 1000 * (1 - u ** (1 + bias)), u uniform: > 0 trains the noisy steps more;
    # sd3 draws its noise level s from a logit-normal (SD3's choice), shifted by this: sigmoid(N(bias, 1))
    grounding_weight: float = 0.05  # weight of the token-grounding loss on cross-attention (0 turns it off)
    coverage_weight: float = 0.1  # weight of the pixel-grounding loss (spreads each word's attention over its object)
    coverage_from: int = 8_000  # step from which the pixel-grounding loss applies (a last phase, as shipped); may
    # move while a run has reached neither value (AHEAD)
    checkpoint_every: int = 250
    checkpoint_minutes: float = 10.0  # a checkpoint at least this often (wall minutes), whatever the step rate
    milestone_every: int = 2_000  # diffusion steps between milestones (EMA weights in fp16, to evaluate); 0: none
    threads: int = 0  # torch threads; 0 keeps torch's default
    device: str = "cpu"  # where the networks train ("cuda" on a GPU machine). Every random draw (scenes, noise,
    # timesteps, dropped captions) is made on the CPU and moved, so a run's data do not depend on the device


LOG_EVERY = 25  # steps between rows of loss.jsonl (each row: the means over those steps)
FREE = ("steps", "threads", "device", "checkpoint_every", "checkpoint_minutes", "milestone_every")  # may change
# between a run's sessions; every other setting is its recipe, and a resume with another recipe is refused
AHEAD = ("coverage_from",)  # settings that act from a step on: one may change while the run has reached neither value
# (its steps so far are the same under both recipes), so a run can start its pixel-grounding phase sooner or later


def recipe_changes(before: dict, recipe: dict, step: int, label: str) -> tuple[list[str], list[str]]:
    """(refused, allowed): the settings of `recipe` (free settings left out) that differ from `before` (a run's
    recipe, or a point's config), as `--name new (label old)`. Allowed: a setting of AHEAD whose old and new values are
    both still ahead of `step`, the step the run has reached; every other change is refused."""
    mine = json.loads(json.dumps(recipe))
    refused, allowed = [], []
    for key in sorted(set(mine) | (set(before) - set(FREE))):
        old, new = before.get(key), mine.get(key)
        if old == new:
            continue
        said = f"--{key.replace('_', '-')} {new} ({label} {old})"
        ahead = key in AHEAD and isinstance(old, int) and isinstance(new, int) and min(old, new) >= step
        (allowed if ahead else refused).append(said)
    return refused, allowed


class Clock:
    """The wall time a run has trained, over all its sessions (kept in the checkpoint as `seconds`), and when the
    next checkpoint is due by time."""

    def __init__(self, state: dict, minutes: float):
        self.state, self.minutes = state, minutes
        self.base, self.start = state.get("seconds", 0.0), time.time()
        self.saved = self.start

    @property
    def seconds(self) -> float:
        return self.base + time.time() - self.start

    def due(self) -> bool:
        return time.time() - self.saved >= 60 * self.minutes

    def mark(self) -> None:
        """Put the trained time in the state; call right before it is saved."""
        self.state["seconds"] = self.seconds
        self.saved = time.time()


def _log(out: Path, **row) -> None:
    with (out / "loss.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint


def train_vae(vae, cfg: TrainConfig, out: Path, state: dict, clock: Clock) -> None:
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
        _, images = world.batch(seed=cfg.seed * 1_000_003 + step, count=cfg.vae_batch, two_objects=cfg.two_objects,
                                margin=cfg.margin, three_objects=cfg.three_objects)
        x = torch.from_numpy(images).to(cfg.device)  # (batch, 3, 64, 64) in [-1, 1]
        i, j = np.random.default_rng([cfg.seed, step]).integers(0, x.shape[-1] // 2 + 1, 2)  # per step: resumable
        if step < cfg.vae_steps - cfg.vae_full_steps:
            half = x.shape[-1] // 2
            x = x[:, :, i : i + half, j : j + half]
        saturated = (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values) > 0.3  # object pixels
        weight = 1 + cfg.vae_object_weight * saturated.float()
        if cfg.vae_edge_weight:  # pixels whose 3x3 neighbourhood holds another colour: both sides of every edge
            spread = torch.nn.functional.max_pool2d(x, 3, 1, 1) + torch.nn.functional.max_pool2d(-x, 3, 1, 1)
            weight = weight + cfg.vae_edge_weight * (spread.amax(1, keepdim=True) > 0.05).float()
        posterior = vae.encode(x).latent_dist
        noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # per step, so a resumed run is the same
        diff = vae.decode(posterior.sample(generator=noise)).sample - x
        rec_loss = (weight * (diff.abs() + diff * diff)).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{rec_loss.item():.5f}")
        if step % 25 == 0:
            _log(out, stage="vae", step=step, loss=rec_loss.item(), kl=kl.item(), hours=clock.seconds / 3600)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps or clock.due():
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step + 1)
            clock.mark()
            _save(out / "checkpoint.pt", state)
    vae.eval()


def object_tokens(tokenizer, caption: str) -> list[int]:
    """For each of the caption's token positions (BOS first): the object its word describes, or -1.

    The words of the k-th " and "-separated part (its colour and shape, not the article) belong to object k.
    """
    owner = [-1]  # BOS
    for k, part in enumerate(caption.split(" and ")):
        words = ([] if k == 0 else ["and"]) + part.split()
        for word in words:
            pieces = len(tokenizer(word, add_special_tokens=False).input_ids)
            owner += [k if word not in ("a", "an", "and") else -1] * pieces
    return owner


def latent_masks(scene: world.Scene, side: int, objects: int = 3) -> np.ndarray:
    """(objects, side, side) float: the share of each latent cell that each object covers (zeros past the last)."""
    out = np.zeros((objects, side, side), dtype=np.float32)
    masks = scene.masks().astype(np.float32)  # (n, size, size)
    f = scene.size // side
    out[: len(masks)] = masks.reshape(len(masks), side, f, side, f).mean((2, 4))
    return out


@torch.no_grad()
def encode_dataset(vae, tokenizer, cfg: TrainConfig) -> dict:
    """Encode dataset_size scenes once: latent means and stds (fp16), captions and their token ids, each token's
    object, object masks at the latent size (fp16), and the scaling and shift factors."""
    means, stds, ids, owners, masks, captions = [], [], [], [], [], []
    chunk = 256
    length = tokenizer.model_max_length
    for i in tqdm(range(0, cfg.dataset_size, chunk), desc="encoding scenes"):
        scenes, images = world.batch(seed=cfg.seed * 7_919 + 10_000_000 + i, count=min(chunk, cfg.dataset_size - i),
                                     two_objects=cfg.two_objects, margin=cfg.margin,
                                     three_objects=cfg.three_objects)
        dist = vae.encode(torch.from_numpy(images).to(cfg.device)).latent_dist
        means.append(dist.mean.half().cpu())
        stds.append(dist.std.half().cpu())
        ids.append(tokenizer([s.caption for s in scenes], padding="max_length", truncation=True,
                             max_length=length, return_tensors="pt").input_ids)
        side = dist.mean.shape[-1]
        captions += [s.caption for s in scenes]
        for scene in scenes:
            owner = object_tokens(tokenizer, scene.caption)[:length]
            owners.append(torch.tensor(owner + [-1] * (length - len(owner)), dtype=torch.int8))
            masks.append(torch.from_numpy(latent_masks(scene, side)).half())
    mean = torch.cat(means)
    # SD's scaling factor makes the latents unit-variance (the 0.18215 of SD 1.x was measured the same way); SD3 also
    # centres them first (its autoencoder's shift_factor, 0.0609, is their mean).
    scaling = float(1.0 / mean.float().std())
    return {"mean": mean, "std": torch.cat(stds), "ids": torch.cat(ids), "owner": torch.stack(owners),
            "masks": torch.stack(masks), "scaling_factor": scaling, "shift_factor": float(mean.float().mean()),
            "captions": captions}


class Grounding(AttentionController):
    """Keeps every cross-attention layer's probabilities (with their gradients) for the grounding loss."""

    def __init__(self):
        self.probs: list[torch.Tensor] = []

    def wants(self, site: Site) -> bool:
        return site.layer.is_cross

    def attention(self, probs: torch.Tensor, site: Site) -> None:
        self.probs.append(probs)  # (batch, heads, pixels, tokens)
        return None

    def loss(self, owner: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two grounding losses of TokenCompose (Wang et al. 2024), averaged over the recorded layers.

        token: for each word token of an object, one minus the share of its (head-mean) attention that falls on the
        object, squared (puts the attention on the object). pixel: binary cross-entropy between each such token's
        attention at every pixel and the object's coverage (spreads it over the whole object).
        owner: (batch, tokens) object index or -1; masks: (batch, objects, side, side) coverage in [0, 1].
        Layers of one map size are computed together (one pass per size, not per layer).
        """
        valid = owner >= 0  # (batch, tokens)
        count = valid.sum().clamp(min=1)
        index = owner.clamp(min=0).long()
        by_size: dict[int, list[torch.Tensor]] = {}
        for probs in self.probs:
            by_size.setdefault(probs.shape[2], []).append(probs.mean(1))  # (batch, pixels, tokens)
        token, pixel = 0.0, 0.0
        for pixels, maps in by_size.items():
            side = int(math.isqrt(pixels))
            pooled = torch.nn.functional.adaptive_avg_pool2d(masks, side).flatten(2)  # (batch, objects, pixels)
            per_token = torch.gather(pooled, 1, index[..., None].expand(-1, -1, pixels))  # (batch, tokens, pixels)
            attn = torch.stack(maps).transpose(2, 3)  # (layers, batch, tokens, pixels)
            inside = (attn * per_token).sum(-1) / attn.sum(-1).clamp(min=1e-8)  # (layers, batch, tokens)
            token = token + (((1 - inside) ** 2) * valid).sum()
            bce = torch.nn.functional.binary_cross_entropy(attn.clamp(1e-6, 1 - 1e-6),
                                                           per_token.expand_as(attn), reduction="none")
            pixel = pixel + (bce.mean(-1) * valid).sum()
        layers = len(self.probs)
        self.probs.clear()
        return token / (count * layers), pixel / (count * layers)


def sd3_pipeline(nets: dict, vae, tokenizer):
    """The SD3 pipeline of the trained networks: one tokenizer for both CLIPs, no T5 (zero tokens in its place)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=nets["transformer"], scheduler=build_flow_scheduler(), vae=vae, text_encoder=nets["text_encoder"],
        tokenizer=tokenizer, text_encoder_2=nets["text_encoder_2"], tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None)


def sd3_prompt_embeds(nets: dict, ids: torch.Tensor, zeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's prompt encoding without T5, from token ids: what `StableDiffusion3Pipeline.encode_prompt` computes for
    these captions (tested equal), without tokenising again each step.

    Each CLIP's penultimate hidden states, side by side (batch, text_length, 2 * width), then `zeros` zero tokens where
    T5's would be; pooled: the two CLIPs' projected outputs side by side (batch, 2 * width)."""
    states, pooled = [], []
    for name in ("text_encoder", "text_encoder_2"):
        out = nets[name](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (batch, text_length, width)
        pooled.append(out[0])  # text_embeds: (batch, width)
    clip = torch.cat(states, -1)  # (batch, text_length, 2 * width) = the transformer's joint_attention_dim
    t5 = clip.new_zeros(clip.shape[0], zeros, clip.shape[-1])
    return torch.cat([clip, t5], 1), torch.cat(pooled, -1)


def draw_timesteps(batch: int, total: int, bias: float, g: torch.Generator) -> torch.Tensor:
    """Training timesteps in [0, total): uniform (bias 0, one randint draw), or t = total * (1 - u ** (1 + bias)) for u
    uniform, whose share at or above total / 2 is 0.5 ** (1 / (1 + bias)): 0.71 at bias 1, more of the noisy steps,
    where the layout is decided."""
    if not bias:
        return torch.randint(0, total, (batch,), generator=g)
    u = torch.rand(batch, generator=g)
    return ((1 - u ** (1 + bias)) * total).long().clamp(0, total - 1)


class DenoisingLoss:
    """One family's training objective: the noised input, the target and the network call, on a batch of latents.

    Everything a step needs is a tensor on the training device, prepared once (the empty caption's ids, the noise
    schedule's cumulative products); the random draws come in from the caller, made on the CPU."""

    def __init__(self, nets: dict, tokenizer, cfg: TrainConfig):
        self.nets, self.cfg = nets, cfg
        self.empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(cfg.device)  # (1, text_length)
        if cfg.family != "sd3":
            self.scheduler = build_train_scheduler(cfg.prediction, cfg.zero_snr)
            alphas = self.scheduler.alphas_cumprod.to(cfg.device)
            self.alpha, self.sigma = alphas.sqrt(), (1 - alphas).sqrt()  # (total,) each
            self.snr = alphas / (1 - alphas)  # (total,) signal-to-noise ratio, as diffusers' compute_snr

    def __call__(self, latents, ids, drop, noise, t, zeros: int = 0) -> tuple[torch.Tensor, int]:
        """(loss, text tokens per caption). latents: (batch, channels, h, w), scaled; ids: (batch, text_length);
        drop: (batch,) bool, captions replaced by the empty one; noise like latents; t: (batch,) timesteps (sd1) or
        noise levels in (0, 1) (sd3); zeros: sd3's zero tokens after the CLIP tokens."""
        ids = torch.where(drop[:, None], self.empty, ids)
        if self.cfg.family == "sd3":
            return self._sd3(latents, ids, noise, t, zeros)
        return self._sd1(latents, ids, noise, t)

    def _sd1(self, latents, ids, noise, t):
        cfg = self.cfg
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        noisy = a * latents + s * noise  # DDPMScheduler.add_noise
        states = self.nets["text_encoder"](ids)[0]
        pred = self.nets["unet"](noisy, t, states).sample
        snr = self.snr[t]
        if cfg.prediction == "v_prediction":  # Min-SNR-gamma (Hang et al. 2023) for each target
            target = a * noise - s * latents  # DDPMScheduler.get_velocity
            if cfg.zero_snr:  # min(snr, gamma) / (snr + 1) would be ~0 over the steps where the layout is decided
                weights = torch.clamp(snr + 1, max=cfg.min_snr_gamma) / (snr + 1)  # plain v loss below gamma - 1
            else:
                weights = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
        else:
            target = noise
            weights = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        return (loss * weights).mean(), ids.shape[1]

    def _sd3(self, latents, ids, noise, sigma, zeros):
        embeds, pooled = sd3_prompt_embeds(self.nets, ids, zeros)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        pred = self.nets["transformer"](hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                        pooled_projections=pooled).sample
        return ((pred - (noise - latents)) ** 2).mean(), embeds.shape[1]


class Batches:
    """The training data as ready tensors on the training device, and each step's random draws.

    Every draw (scene indices, the latent sample's noise, dropped captions, the diffusion noise and timesteps, SD3's
    zero-token count) comes from a CPU generator seeded by the step, so a resumed run and a run on another device see
    the same data; only the draws move to the device, the dataset is moved once."""

    def __init__(self, data: dict, cfg: TrainConfig):
        self.cfg = cfg
        device = cfg.device
        self.mean, self.std = data["mean"].to(device), data["std"].to(device)  # (n, channels, h, w) fp16
        self.ids = data["ids"].to(device)  # (n, text_length)
        self.owner = data["owner"].to(device)  # (n, text_length) int8
        self.masks = data["masks"].to(device)  # (n, objects, h, w) fp16
        self.shift = data["shift_factor"] if cfg.family == "sd3" else 0.0
        self.scaling = data["scaling_factor"]
        self.total = build_train_scheduler().config.num_train_timesteps

    def draw(self, step: int) -> dict:
        cfg, batch = self.cfg, self.cfg.batch
        g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
        idx = torch.randint(0, self.mean.shape[0], (batch,), generator=g)
        sample = torch.randn(batch, *self.mean.shape[1:], generator=g)  # the autoencoder's posterior sample
        drop = torch.rand(batch, generator=g) < cfg.uncond_prob
        if cfg.family == "sd3":  # zero tokens where T5's would be: log-uniform from 1 up to (not including) the max
            zeros = int(math.exp(torch.rand((), generator=g).item() * math.log(cfg.zero_tokens)))
            noise = torch.randn(batch, *self.mean.shape[1:], generator=g)
            t = torch.sigmoid(torch.randn(batch, generator=g) + cfg.timestep_bias)  # logit-normal (SD3's choice)
        else:
            zeros = 0
            noise = torch.randn(batch, *self.mean.shape[1:], generator=g)
            t = draw_timesteps(batch, self.total, cfg.timestep_bias, g)
        idx, sample, drop, noise, t = (x.to(cfg.device, non_blocking=True) for x in (idx, sample, drop, noise, t))
        latents = self.mean[idx].float() + self.std[idx].float() * sample
        latents = (latents - self.shift) * self.scaling
        return {"latents": latents, "ids": self.ids[idx], "drop": drop, "noise": noise, "t": t, "zeros": zeros,
                "owner": self.owner[idx].long(), "masks": self.masks[idx].float()}


TRAINER_FORMAT = 2  # checkpoints of the flat-parameter trainer (1: per-tensor AdamW and diffusers' EMAModel)


def write_milestone(path: Path, nets: dict, vae, meta: dict) -> None:
    """The networks' current weights (and the autoencoder's, if given) in fp16, one safetensors file with `meta` (each
    value JSON) as its metadata: what `runs evaluate` exports and a session may commit as its resume point."""
    from safetensors.torch import save_file

    parts = {**nets, **({"vae": vae} if vae is not None else {})}
    tensors = {f"{name}.{key}": (value.half() if value.is_floating_point() else value).detach().cpu().contiguous()
               for name, net in parts.items() for key, value in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)


def load_milestone(path: Path, nets: dict, vae=None) -> dict:
    """Load a milestone's weights into `nets` (and `vae`, where it holds one); returns its metadata. A resume point
    (`points.py`: parameters only, no buffers) loads too, so a point can be exported and evaluated."""
    from .points import load_weights, read_point

    tensors, meta = read_point(path)
    for name, net in {**nets, **({"vae": vae} if vae is not None else {})}.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if own or name != "vae":
            load_weights(net, own, name)
    return meta


def train_diffusion(nets: dict, data: dict, tokenizer, cfg: TrainConfig, out: Path, state: dict, vae=None,
                    clock: Clock | None = None, recipe: dict | None = None):
    """Train the denoiser and text encoders (`nets`, by component name) together; leaves the EMA weights in them.

    The parameters live in one flat buffer (`optim.FlatParameters`): fused AdamW, the EMA and gradient clipping are a
    few operations a step. Nothing is read back to the host but every `LOG_EVERY` steps (the logged losses)."""
    if "opt" in state and state.get("trainer") != TRAINER_FORMAT:
        raise P2PError(f"{out / 'checkpoint.pt'} was written by an older trainer (per-parameter optimiser state); "
                       f"expected a checkpoint of trainer format {TRAINER_FORMAT}: start the run in a new --out")
    for name, net in nets.items():
        if name in state:
            net.load_state_dict(state[name])
    flat = FlatParameters(nets)
    opt = adamw(flat.param, cfg.lr, weight_decay=1e-2)
    ema = EMA(flat.param, cfg.ema_decay)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
    elif "warm_from" in state:  # restarted from a resume point: the weights are the EMA's, so is the average's start,
        ema.updates = state["warm_from"]  # at its full decay at once
    warm_from = state.get("warm_from", 0)  # the learning rate warms up from here (0, or a restart's step)
    objective = DenoisingLoss(nets, tokenizer, cfg)
    batches = Batches(data, cfg)
    clock = clock or Clock(state, cfg.checkpoint_minutes)
    start = state.get("step", 0)
    for net in nets.values():
        net.train()
    grounding = Grounding()
    grounded = bool(cfg.grounding_weight or cfg.coverage_weight)
    denoiser = nets.get("unet", nets.get("transformer"))
    recording = control(denoiser, grounding, prompts=cfg.batch) if grounded else contextlib.nullcontext()
    names = ("loss", "grounding", "coverage") if grounded else ("loss",)
    running = torch.zeros(len(names), device=cfg.device)  # sums since the last log row, read every LOG_EVERY steps
    with recording:
        bar = tqdm(range(start, cfg.steps), desc="diffusion", initial=start, total=cfg.steps)
        for step in bar:
            warm = min(1.0, (step + 1 - warm_from) / cfg.warmup)  # fresh AdamW moments need a warm-up again
            lr = cfg.lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
            opt.param_groups[0]["lr"] = lr
            b = batches.draw(step)
            loss, text = objective(b["latents"], b["ids"], b["drop"], b["noise"], b["t"], b["zeros"])
            parts = [loss.detach()]
            if grounded:
                owner = b["owner"].masked_fill(b["drop"][:, None], -1)  # a dropped caption names nothing
                owner = torch.nn.functional.pad(owner, (0, text - owner.shape[1]), value=-1)  # sd3: zero tokens
                ground, cover = grounding.loss(owner, b["masks"])
                covering = cfg.coverage_weight if step >= cfg.coverage_from else 0.0
                loss = loss + cfg.grounding_weight * ground + covering * cover
                parts += [ground.detach(), cover.detach()]
            flat.zero_grad()
            loss.backward()
            flat.clip_grad_norm(1.0)
            opt.step()
            ema.step(flat.param)
            running += torch.stack(parts)
            if (step + 1 - start) % LOG_EVERY == 0 or step + 1 == cfg.steps:
                seen = (step + 1 - start) % LOG_EVERY or LOG_EVERY
                logged = dict(zip(names, (running / seen).tolist()))  # the one host read of the interval
                running.zero_()
                bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items()})
                _log(out, stage="diffusion", step=step, steps=seen, lr=lr, hours=clock.seconds / 3600, **logged)
            if cfg.milestone_every and (step + 1) % cfg.milestone_every == 0:
                kept = flat.param.detach().clone()
                ema.copy_to(flat.param)  # the EMA weights are the model
                write_milestone(milestone_path(out, step + 1), nets, None if cfg.vae_from else vae,
                                {"step": step + 1, "hours": clock.seconds / 3600, "config": recipe or asdict(cfg),
                                 "scaling_factor": batches.scaling, "shift_factor": data["shift_factor"]})
                with torch.no_grad():
                    flat.param.copy_(kept)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or clock.due():
                state.update({name: net.state_dict() for name, net in nets.items()}, opt=opt.state_dict(),
                             ema=ema.state_dict(), step=step + 1, trainer=TRAINER_FORMAT)
                clock.mark()
                _save(out / "checkpoint.pt", state)
    ema.copy_to(flat.param)  # the EMA weights are the model we ship
    flat.release()


def save_pipeline(folder: Path, vae, nets: dict, tokenizer, factors: dict, cfg: TrainConfig) -> Path:
    """A standard diffusers pipeline folder: StableDiffusionPipeline (sd1) or StableDiffusion3Pipeline (sd3);
    factors: the latents' scaling_factor and shift_factor (from the encoded dataset or a milestone)."""
    from diffusers import StableDiffusionPipeline

    vae, nets = vae.to("cpu"), {name: net.to("cpu") for name, net in nets.items()}  # a pipeline folder loads anywhere
    vae.register_to_config(scaling_factor=factors["scaling_factor"])
    if cfg.family == "sd3":
        vae.register_to_config(shift_factor=factors["shift_factor"])
        pipe = sd3_pipeline(nets, vae, tokenizer)
        tokenizer_folders = ("tokenizer", "tokenizer_2")
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=nets["text_encoder"], tokenizer=tokenizer, unet=nets["unet"],
            scheduler=build_scheduler(cfg.prediction, cfg.zero_snr), safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False)
        tokenizer_folders = ("tokenizer",)
    pipe.save_pretrained(folder, safe_serialization=True)
    if cfg.family == "sd3":  # diffusers leaves absent components out of the index, then refuses to load without them
        index_path = Path(folder) / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for sub in tokenizer_folders:  # transformers writes only tokenizer.json; keep CLIP's own files too
        for name in ("vocab.json", "merges.txt"):
            shutil.copy2(Path(tokenizer.name_or_path) / name, Path(folder) / sub / name)
    return folder


def build_nets(cfg: TrainConfig, model_cfg: ShapesModelConfig) -> dict:
    """The networks a family trains, by their pipeline component names."""
    if cfg.family == "sd3":
        return {"transformer": build_transformer(model_cfg),
                "text_encoder": build_text_encoder(model_cfg, projection=True),
                "text_encoder_2": build_text_encoder(model_cfg, projection=True)}
    return {"unet": build_unet(model_cfg), "text_encoder": build_text_encoder(model_cfg)}


def model_fields() -> dict:
    """The architecture's settings a run may change (the vocabulary and text length come from the tokenizer)."""
    return {k: v for k, v in asdict(ShapesModelConfig()).items() if k not in ("vocab_size", "max_length")}


def _flag(text: str) -> bool:
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {text!r}")
    return text.lower() in ("1", "true", "yes")


def _replay(out: Path, cfg: TrainConfig, architecture: dict) -> list[str]:
    """The arguments that start this run again exactly: its folder and every setting spelt out, so a resume keeps the
    recipe even if the trainer's defaults change meanwhile."""
    argv = ["--out", str(out.resolve())]
    for key, value in {**asdict(cfg), **architecture}.items():
        values = value if isinstance(value, tuple | list) else (value,)
        argv += [f"--{key.replace('_', '-')}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return argv


def _without(argv: list[str], flag: str) -> list[str]:
    """argv less `flag` and its value: the command as typed, as the row quotes it (a restart is no part of it)."""
    return [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)]


def _claim(out: Path, parser) -> Path:
    """One trainer per run folder: a second one would interleave its checkpoints with the first's."""
    lock = out / "train.pid"
    try:
        pid = int(lock.read_text())
        if pid != os.getpid():
            os.kill(pid, 0)
            parser.error(f"another trainer (pid {pid}) is training in {out}: stop it first, or train elsewhere")
    except (OSError, ValueError):  # no lock, or its process is gone
        pass
    lock.write_text(str(os.getpid()))
    return lock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, metavar="NAME",
                        help=f"train in RUNS/NAME, RUNS being $P2P_RUNS or {runs_root()} now: outside the checkout, "
                        "so the run outlives the session (default: shapes, or shapes-flow with --family sd3)")
    parser.add_argument("--out", default=None, help="train in this folder instead of a named run's")
    parser.add_argument("--export", default=None, metavar="FOLDER",
                        help="only write the checkpoint's EMA weights as a pipeline to FOLDER (to look at a run "
                        "while it trains), then stop")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="with --export: the weights of this milestone file (or resume point) instead of the "
                        "checkpoint's")
    parser.add_argument("--point", default=None, metavar="FILE",
                        help="only write the checkpoint's EMA weights as a resume point (fp16, <= 10 MB: "
                        "shapes.points) to FILE, then stop")
    parser.add_argument("--restart-from", default=None, metavar="FILE",
                        help="start the run from a resume point (or a milestone) when its folder holds no "
                        "checkpoint: its weights, step and hours; a fresh optimiser (shapes.points)")
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=_flag if isinstance(default, bool) else type(default),
                            default=default, help=f"TrainConfig.{field} (default {default})")
    for field, default in model_fields().items():
        many = isinstance(default, tuple)
        kind = type(default[0]) if many else type(default)
        shown = " ".join(map(str, default)) if many else default
        parser.add_argument(f"--{field.replace('_', '-')}", type=_flag if kind is bool else kind, default=default,
                            nargs="+" if many else None, help=f"ShapesModelConfig.{field} (default {shown})")
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    if cfg.family not in ("sd1", "sd3"):
        parser.error(f"--family: expected sd1 or sd3, got {cfg.family!r}")
    if cfg.zero_snr and (cfg.family != "sd1" or cfg.prediction != "v_prediction"):
        parser.error(f"--zero-snr true: expected --family sd1 with --prediction v_prediction, got --family "
                     f"{cfg.family} --prediction {cfg.prediction}")
    if args.weights and not args.export:
        parser.error("--weights: expected it with --export FOLDER (a milestone is exported, never trained from)")
    if args.restart_from and (args.export or args.point):
        parser.error("--restart-from trains; --export and --point only write what a run holds: give one")
    if args.out and args.run:
        parser.error(f"--out {args.out} and --run {args.run} name the run's folder twice: give one")
    from ..errors import P2PError
    from ..loading import resolve_device

    try:
        resolve_device(cfg.device)  # the same check as every p2p command's --device
    except P2PError as error:
        parser.error(f"--device: {error}")
    from ..numbers import check_threads

    try:
        check_threads(cfg.threads)
    except P2PError as error:
        parser.error(str(error))
    try:
        out = Path(args.out).expanduser() if args.out else run_folder(
            args.run or ("shapes-flow" if cfg.family == "sd3" else "shapes"))
    except P2PError as error:
        parser.error(f"--run: {error}")
    architecture = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in model_fields()}
    recipe = {k: v for k, v in {**asdict(cfg), **architecture}.items() if k not in FREE}
    ckpt = out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False, map_location="cpu") if ckpt.exists() else {}
    changes: list[str] = []  # settings of AHEAD changed for the steps to come (recorded in the state)
    if not args.export and "recipe" in state:
        refused, changes = recipe_changes(state["recipe"], recipe, state.get("step", 0), "was")
        if refused:
            parser.error(f"{out} holds a run of another recipe; resume it with the settings it was started with, or "
                         f"train in another folder. Changed: {'; '.join(refused)}")
    restart = None
    if args.restart_from:
        from . import points

        if "step" in state or "vae_step" in state:
            parser.error(f"--restart-from: {out} holds a checkpoint (step {state.get('step', 0):,}); the run resumes "
                         "from it: leave --restart-from out, or restart into an empty folder")
        try:
            restart = points.read_point(Path(args.restart_from).expanduser())
        except P2PError as error:
            parser.error(f"--restart-from: {error}")
        refused, changes = recipe_changes(restart[1]["config"], recipe, int(restart[1]["step"]), "the point's:")
        if refused:
            parser.error(f"--restart-from: the point was trained with another recipe; give its settings. Changed: "
                         f"{'; '.join(refused)}")
    out.mkdir(parents=True, exist_ok=True)
    if restart and not cfg.vae_from and not (out / "tokenizer" / "merges.txt").exists():
        points.write_tokenizer(restart[1], out / "tokenizer")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    from transformers import CLIPTokenizer

    if cfg.vae_from:  # the autoencoder and tokenizer of a trained pipeline, copied into the run at its start, so
        # that a resume reads the same ones even if the source changes meanwhile (a bundled model shipped anew)
        from diffusers import AutoencoderKL

        from ..loading import resolve

        for part in ("vae", "tokenizer"):
            if not (out / part).exists():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copytree(resolve(cfg.vae_from) / part, out / f".{part}.tmp", dirs_exist_ok=True)
                (out / f".{part}.tmp").replace(out / part)
        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=cfg.text_length)
        vae = AutoencoderKL.from_pretrained(out / "vae")
    else:
        folder = out / "tokenizer"
        if not (folder / "merges.txt").exists():
            train_tokenizer(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=cfg.text_length)
        vae = None
    model_cfg = replace(ShapesModelConfig(), **architecture, vocab_size=len(tokenizer),
                        max_length=tokenizer.model_max_length)
    vae = (vae or build_vae(model_cfg)).to(cfg.device)
    nets = {name: net.to(cfg.device) for name, net in build_nets(cfg, model_cfg).items()}
    state.setdefault("config", asdict(cfg))
    if "vae" in state:
        vae.load_state_dict(state["vae"])
    if args.export or args.point:
        export(args, parser, out, state, nets, vae, tokenizer, cfg)
        return
    lock = _claim(out, parser)
    try:
        state["recipe"] = json.loads(json.dumps(recipe))
        if restart:  # the point's weights, step and hours; kept at once (a stop while encoding loses nothing)
            try:
                state.update(points.restore(*restart, nets, vae))
            except P2PError as error:
                parser.error(f"--restart-from: {error}")
            if not cfg.vae_from:  # the autoencoder stage is behind the point
                state.update(vae=vae.state_dict(), vae_step=cfg.vae_steps)
            # the latents' factors the weights were trained with (not recomputed with a rounded autoencoder)
            state["factors"] = {k: restart[1][k] for k in ("scaling_factor", "shift_factor")
                                if restart[1].get(k) is not None}
            state.update({name: net.state_dict() for name, net in nets.items()})
            _save(out / "checkpoint.pt", state)
            milestone = milestone_path(out, state["step"])
            if cfg.milestone_every and state["step"] % cfg.milestone_every == 0 and not milestone.exists():
                # the point was a milestone of the lost folder: put it back, so `runs evaluate` finds it
                write_milestone(milestone, nets, None if cfg.vae_from else vae,
                                {"step": state["step"], "hours": state["seconds"] / 3600,
                                 "config": {**asdict(cfg), **architecture}, "shift_factor": None, **state["factors"]})
            evals = restart[1].get("evals") or []
            if evals and not (out / "evals.jsonl").exists():
                (out / "evals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evals))
        if changes:  # a setting of AHEAD changed: the steps to come follow the new recipe, and the run says so
            state.setdefault("recipe_changes", []).append({"step": state.get("step", 0), "changes": changes})
            print(f"the recipe changes from step {state.get('step', 0):,}: {'; '.join(changes)}")
        earlier = json.loads((out / "command.json").read_text()) if (out / "command.json").exists() else {}
        given = _without(list(sys.argv[1:] if argv is None else argv), "--restart-from")
        typed = given if changes else earlier.get("typed") or given  # the command that now resumes the run
        (out / "command.json").write_text(json.dumps({"argv": _replay(out, cfg, architecture), "typed": typed,
                                                      "config": asdict(cfg), "architecture": architecture}, indent=2))
        clock = Clock(state, cfg.checkpoint_minutes)
        if not cfg.vae_from and state.get("vae_step", 0) < cfg.vae_steps:
            train_vae(vae, cfg, out, state, clock)
        vae.eval()
        data_path = out / "latents.pt"
        if data_path.exists():
            data = torch.load(data_path, map_location="cpu")
        else:
            data = encode_dataset(vae, tokenizer, cfg)
            data.update(state.get("factors", {}))  # a restarted run's, from its point
            _save(data_path, data)
        (out / "config.json").write_text(json.dumps({**asdict(cfg), **architecture}, indent=2))  # the card quotes it
        train_diffusion(nets, data, tokenizer, cfg, out, state, vae, clock, {**asdict(cfg), **architecture})
        folder = save_pipeline(out / "pipeline", vae, nets, tokenizer, data, cfg)
        print(f"saved {folder} after {clock.seconds / 3600:.2f} h of training in all")
    finally:
        lock.unlink(missing_ok=True)


def export(args, parser, out: Path, state: dict, nets: dict, vae, tokenizer, cfg: TrainConfig) -> None:
    """--export: the checkpoint's EMA weights (or a milestone's, --weights) as a pipeline folder; --point: the
    checkpoint's EMA weights as a resume point. Trains nothing."""
    if args.weights:
        weights = Path(args.weights).expanduser()
        if not weights.is_file():
            parser.error(f"--weights: expected a milestone file (.safetensors), got {weights}")
        try:
            meta = load_milestone(weights, nets, None if "vae" in state or cfg.vae_from else vae)
        except P2PError as error:
            parser.error(f"--weights: {error}")
        save_pipeline(Path(args.export), vae, nets, tokenizer, meta, cfg)
        print(f"exported the milestone of step {meta['step']} to {args.export}")
        return
    if state.get("trainer") != TRAINER_FORMAT:
        parser.error(f"--export: expected a checkpoint of trainer format {TRAINER_FORMAT} in {out}, found "
                     f"{'none' if 'step' not in state else 'an older one'}")
    for name, net in nets.items():
        net.load_state_dict(state[name])
    flat = FlatParameters(nets)
    ema = EMA(flat.param, cfg.ema_decay)
    ema.load_state_dict(state["ema"])
    ema.copy_to(flat.param)
    flat.release()
    data = torch.load(out / "latents.pt", map_location="cpu")
    if args.point:
        from . import points
        from .runs import _rows

        command = json.loads((out / "command.json").read_text())
        meta = {"step": state["step"], "hours": state["seconds"] / 3600, "config": command["config"] | {
            k: list(v) if isinstance(v, tuple) else v for k, v in command["architecture"].items()},
            "typed": command["typed"], "scaling_factor": data["scaling_factor"],
            "shift_factor": data["shift_factor"], "evals": _rows(out / "evals.jsonl")}
        try:
            path = points.write_point(Path(args.point), nets, vae, meta, cfg.vae_from, out / "tokenizer")
        except P2PError as error:
            parser.error(f"--point: {error}")
        print(f"wrote the resume point of step {state['step']:,} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    save_pipeline(Path(args.export), vae, nets, tokenizer, data, cfg)
    print(f"exported step {state['step']} to {args.export}")


if __name__ == "__main__":
    main()
