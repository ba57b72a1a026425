"""Ship a trained shapes pipeline inside the package, with its model card, once its evaluation passes the bars.

    python -m prompt2prompt.shapes.ship runs/shapes --eval eval.json

Refuses (and writes nothing) when the evaluation misses a bar or the pipeline is over 25 MB; with `--over EVAL`, when
it is not better than the shipped model (EVAL: its evaluation by the same evaluator) on every measure instead. The card
records the world, the architecture, the training command and settings, and the measured table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
from pathlib import Path

from ..errors import InputError
from ..loading import BUNDLED
from ..outputs import staged
from .evaluate import BARS, MEASURES
from .runs import typed_arguments

MAX_BYTES = 25 * 2**20
WEIGHTS = ("*.safetensors", "*.json", "*.txt")


def _files(folder: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHTS for p in folder.rglob(pattern))


def _params(folder: Path, component: str) -> int:
    from safetensors import safe_open

    total = 0
    for path in (folder / component).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


WORLD = """## The world
`prompt2prompt.shapes.world`: 64x64 images of one or two flat-coloured shapes (circle, square, triangle, cross) in six
colours (red, orange, yellow, green, blue, purple) on a dark or light grey background, at random positions and sizes,
captioned "a red circle and a blue square", "a circle and a square" (colours left to the model) or "a red circle".
Every image comes with the true mask of each object. Training may add scenes of three objects ("a red circle and a
blue square and a green cross"), as contrast: the evaluator's captions name one or two."""


def _mix_line(config: dict) -> str:
    """'60% with two objects, 15% with three': the run's scene mix."""
    mix = f"{config.get('two_objects', 0.6):.0%} with two objects"
    return mix + (f", {config['three_objects']:.0%} with three" if config.get("three_objects") else "")


def _flags(config: dict, run: Path | None = None) -> str:
    """The training command's arguments: as typed when the run was started (its command.json; the thread count left
    out, it is no part of the recipe), else every setting of its config.json."""
    typed = typed_arguments(run) if run is not None else []
    if typed:
        return " ".join(shlex.quote(a) for a in typed)
    return " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in config.items() if k not in ("threads",) and v != "")


def _scheduler_line(config: dict) -> str:
    base = "DDIM with SD 1.x's noise schedule (scaled linear, 0.00085 to 0.012, 1000 steps"
    if config.get("zero_snr"):
        return (base + "), rescaled to zero terminal SNR and sampled with trailing timesteps from its last step (Lin "
                "et al. 2024, \"Common Diffusion Noise Schedules and Sample Steps are Flawed\"), v-prediction.")
    prediction = "v-prediction" if config.get("prediction") == "v_prediction" else "epsilon prediction"
    return base + f", {prediction})."


def _weighting_line(config: dict) -> str:
    gamma = config.get("min_snr_gamma", 5.0)
    if config.get("zero_snr"):
        return (f"a v loss weighted min(SNR + 1, {gamma:g}) / (SNR + 1) (Min-SNR, Hang et al. 2023, on SNR + 1, so "
                "the noisiest steps, where the layout is decided, keep their weight)")
    return f"Min-SNR-{gamma:g} weighting (Hang et al. 2023)"


def _cross_attention_sides(config: dict) -> str:
    levels = config.get("cross_attention_levels", [True, True, False])
    side = config.get("image_size", 64) // 4  # the latent's side; each UNet level halves it
    sides = [f"{side >> k}x{side >> k}" for k, on in enumerate(levels) if on]
    middle = f"{side >> (len(levels) - 1)}x{side >> (len(levels) - 1)}"
    return ", ".join(sides) + f" and the {middle} middle" if sides else f"the {middle} middle only"


def model_card(run: Path, evaluation: dict, pipeline: Path, name: str = "shapes") -> str:
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    bars = BARS[name]
    table = "\n".join(f"| {label} | {evaluation[key]:.3f} | {bars[key]:.2f} |" if key in bars else
                      f"| {label} | {evaluation[key]:.3f} | |" for key, label in MEASURES.items() if key in evaluation)
    size = sum(p.stat().st_size for p in _files(pipeline))
    settings = evaluation.get("settings", {})
    if config.get("family") == "sd3":
        return _flow_card(config, evaluation, pipeline, table, size, settings, run)
    params = {c: _params(pipeline, c) for c in ("unet", "text_encoder", "vae")}
    flags = _flags(config, run)
    edges = f" and on both sides of every edge ({config['vae_edge_weight']:g})" if config.get("vae_edge_weight") else ""
    return f"""# shapes: a small Stable Diffusion of a synthetic world

The model `load_pipeline("shapes")` returns, and the default of every `p2p` command. A standard diffusers
`StableDiffusionPipeline` folder ({size / 2**20:.1f} MB, safetensors): it loads with
`StableDiffusionPipeline.from_pretrained` like any SD 1.x checkpoint.

{WORLD}

## Architecture (Stable Diffusion's components, small)
- Tokenizer: CLIP BPE files (`vocab.json`, `merges.txt`) learnt from the world's words, `model_max_length`
  {config.get('text_length', 77)}.
- Text encoder: `CLIPTextModel`, {params['text_encoder'] / 1e6:.2f} M parameters, trained jointly with the UNet.
- UNet: `UNet2DConditionModel` on 16x16x4 latents, {params['unet'] / 1e6:.2f} M parameters, cross-attention at
  {_cross_attention_sides(config)}.
- Autoencoder: `AutoencoderKL`, 64x64 RGB to 16x16x4, {params['vae'] / 1e6:.2f} M parameters.
- Scheduler: {_scheduler_line(config)}

## Training
```
python -m prompt2prompt.shapes.train {flags or '--out runs/shapes'}
```
Seeded and resumable. Autoencoder first (L1 + L2, extra weight on object pixels{edges}, tiny KL), then the UNet and
text encoder together on latents of {config.get('dataset_size', 40000):,} scenes ({_mix_line(config)}) with
{_weighting_line(config)}, 10% empty captions for classifier-free guidance, and EMA weights.
The cross-attention is also trained to point at the objects, with the two grounding losses of TokenCompose (Wang et
al. 2024, "TokenCompose: Grounding Diffusion with Token-level Supervision") on each colour and shape word, using the
world's masks: the token loss (the share of a word's attention on its object) throughout, weight
{config.get('grounding_weight', 0.05)}, and the pixel loss (cross-entropy of the word's attention at each pixel
against the object's mask) from step {config.get('coverage_from', 0)}, weight {config.get('coverage_weight', 0.0)}.
A model this small, trained from scratch on a CPU's budget, otherwise attends to all words alike (every
token's map the same) and binds colours to the wrong objects; real Stable Diffusion learns this grounding from scale.
The attention IoU below is therefore partly trained for: it shows that the maps are usable for Prompt-to-Prompt's
editing and local blending, not that grounding emerges by itself.

## Measured
`python -m prompt2prompt.shapes.evaluate --model shapes --json eval.json`: {evaluation['count']} seeded captions,
{settings.get('steps', 50)} DDIM steps, guidance {settings.get('guidance', 7.5)}; colours and shapes found by colour
segmentation and template fit (the evaluator scores 100% on the world's own renders).

| measure | value | bar |
|---|---|---|
{table}
"""


def _flow_card(config: dict, evaluation: dict, pipeline: Path, table: str, size: int, settings: dict,
               run: Path | None = None) -> str:
    params = {c: _params(pipeline, c) for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    return f"""# shapes-flow: a small Stable Diffusion 3 (MM-DiT, flow matching) of a synthetic world

The model `load_pipeline("shapes-flow")` returns (`--model shapes-flow`). A standard diffusers
`StableDiffusion3Pipeline` folder ({size / 2**20:.1f} MB, safetensors) without T5, which loads as diffusers documents
for SD3 without T5: `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`.

{WORLD}

## Architecture (Stable Diffusion 3's components, small)
- Tokenizer: the `shapes` model's CLIP BPE files, `model_max_length` {config.get('text_length', 77)}, for both CLIPs.
- Text encoders: two `CLIPTextModelWithProjection`, {params['text_encoder'] / 1e6:.2f} M and
  {params['text_encoder_2'] / 1e6:.2f} M parameters, trained jointly with the transformer. As in SD3, their
  penultimate layers' states side by side are the text tokens, their pooled outputs side by side the pooled
  conditioning, and the pipeline appends `max_sequence_length` zero tokens where T5's would be.
- Transformer: `SD3Transformer2DModel`, {config.get('transformer_layers')} joint blocks,
  {config.get('transformer_heads')} heads of {config.get('transformer_head_dim')}, patch {config.get('patch_size')}
  on 16x16x4 latents, {params['transformer'] / 1e6:.2f} M parameters.
- Autoencoder: the `shapes` model's (reused, not retrained), {params['vae'] / 1e6:.2f} M parameters, with SD3's
  latent shift (their mean) and scale (one over their standard deviation).
- Scheduler: `FlowMatchEulerDiscreteScheduler`, shift 1.0.

## Training
```
python -m prompt2prompt.shapes.train {_flags(config, run)}
```
Seeded and resumable. Flow matching as SD3 (Esser et al. 2024): x_s = (1 - s) x_0 + s noise, the transformer
predicts noise - x_0, s drawn from a logit-normal; 10% empty captions for classifier-free guidance; the number of
zero (T5) tokens drawn log-uniformly from 1 up to {config.get('zero_tokens', 256)} each step, so that any
`max_sequence_length` works; EMA weights. The joint attention's image-to-text block is trained to point at the
objects with TokenCompose's two grounding losses (Wang et al. 2024) on each colour and shape word, token loss weight
{config.get('grounding_weight')}, pixel loss weight {config.get('coverage_weight')} from step
{config.get('coverage_from')}: the attention IoU below is partly trained for.

## Measured
`python -m prompt2prompt.shapes.evaluate --model shapes-flow --json eval.json`: {evaluation['count']} seeded
captions, {settings.get('steps', 50)} Euler steps, guidance {settings.get('guidance', 7.5)}.

| measure | value | bar |
|---|---|---|
{table}
"""


IMPROVED = ("colour_accuracy", "shape_accuracy", "exact_count", "exact_count_two", "attention_iou",
            "autoencoder_psnr")  # what a first improvement must beat the shipped model on (issue #43's list)


def improvements(evaluation: dict, shipped: dict) -> list[str]:
    """Why `evaluation` is not better than `shipped` on every measure of IMPROVED (a measure both score 1.0 on may
    tie); [] when it is."""
    missing = [k for k in IMPROVED if k not in evaluation or k not in shipped]
    if missing:
        return [f"{', '.join(missing)} not measured in both (evaluate both with prompt2prompt.shapes.evaluate)"]
    return [f"{k} {evaluation[k]:.3f} <= {shipped[k]:.3f}" for k in IMPROVED
            if not (evaluation[k] > shipped[k] or evaluation[k] == shipped[k] == 1.0)]


def ship(run: Path, evaluation: dict, name: str = "shapes", provenance: str = "", over: dict | None = None,
         pipeline: Path | None = None) -> Path:
    """Copy run/pipeline (or `pipeline`: a milestone's export) to the bundled model `name` with its card (provenance:
    a paragraph on how the weights were made, for the card's last section) and its evaluation. It must pass its bars,
    or, with `over` (the shipped model's evaluation by the same evaluator), be better than that on every measure: a
    first improvement."""
    pipeline = pipeline or run / "pipeline"
    if not (pipeline / "model_index.json").exists():
        raise InputError(f"{pipeline} is not a pipeline folder: expected the model_index.json that training writes")
    if over is not None:
        worse = improvements(evaluation, over)
        if worse:
            raise InputError(f"not shipped: not better than the shipped model on every measure ({'; '.join(worse)})")
    else:
        missing = [k for k in BARS[name] if k not in evaluation]
        if missing:
            raise InputError(f"not shipped: the evaluation lacks {', '.join(missing)} (run "
                             "prompt2prompt.shapes.evaluate)")
        failed = [f"{k} {evaluation[k]:.3f} < {bar}" for k, bar in BARS[name].items() if evaluation[k] < bar]
        if failed:
            raise InputError(f"not shipped: the evaluation misses its bars ({'; '.join(failed)})")
    size = sum(p.stat().st_size for p in _files(pipeline))
    if size > MAX_BYTES:
        raise InputError(f"not shipped: the pipeline is {size / 2**20:.1f} MB, over the 25 MB limit")
    target = BUNDLED[name]
    with staged(target, owned=True) as tmp:
        for path in _files(pipeline):
            dest = tmp / path.relative_to(pipeline)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        card = model_card(run, evaluation, pipeline, name)
        if provenance.strip():
            card += f"\n## Provenance\n{provenance.strip()}\n"
        (tmp / "README.md").write_text(card)
        (tmp / "eval.json").write_text(json.dumps({k: v for k, v in evaluation.items() if k != "per_caption"},
                                                  indent=2))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training run folder (with pipeline/ and config.json)")
    parser.add_argument("--eval", required=True, help="the JSON that `prompt2prompt.shapes.evaluate --json` wrote")
    parser.add_argument("--name", default="shapes", choices=sorted(BUNDLED),
                        help="which bundled model it becomes (default: shapes)")
    parser.add_argument("--provenance", default=None, metavar="FILE",
                        help="a text file whose paragraph becomes the card's Provenance section (how and when the run "
                        "was made)")
    parser.add_argument("--step", type=int, default=None,
                        help="ship the run's milestone of this step (its export, milestones/step-N/, as `python -m "
                        "prompt2prompt.shapes.runs evaluate` writes it) instead of its final pipeline")
    parser.add_argument("--over", default=None, metavar="EVAL",
                        help="ship a first improvement: better than the shipped model's evaluation in this JSON (the "
                        "same evaluator's) on every measure, instead of passing the bars")
    args = parser.parse_args(argv)
    provenance = Path(args.provenance).read_text() if args.provenance else ""
    over = json.loads(Path(args.over).read_text()) if args.over else None
    run = Path(args.run).expanduser()
    pipeline = run / "milestones" / f"step-{args.step:06d}" if args.step is not None else None
    target = ship(run, json.loads(Path(args.eval).read_text()), args.name, provenance, over, pipeline)
    print(f"shipped {target}")


if __name__ == "__main__":
    main()
