"""Tiny random Stable Diffusion 1.x, 2.x and XL pipelines, built offline in code (as diffusers' own tests do).

They have the real architectures at toy widths: SD 1.x (epsilon, 32-wide text), SD 2.x (v-prediction, linear
projections, a wider text encoder, "!" padding), SDXL (two text encoders, added time/text conditioning). Used by the
tests and the benchmarks; weights are random, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .shapes.model import SD_SCHEDULE
from .shapes.tokenizer import train_tokenizer


def tiny_tokenizer(folder: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
    train_tokenizer(folder)
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **extra)


def _text_config(tokenizer, width: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or width, bos_token_id=0,
        eos_token_id=1, pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )


def tiny_pipeline(kind: str, folder: str | Path, seed: int = 0):
    """kind: 'sd1', 'sd2' or 'sdxl'. folder receives the tokenizer files. Latents are 16x16 (images 32x32)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    if kind in ("sd1", "sd2"):
        sd2 = kind == "sd2"
        tokenizer = tiny_tokenizer(folder / "tokenizer", pad_token="!" if sd2 else None)
        width = 64 if sd2 else 32
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=(2, 4), use_linear_projection=sd2, norm_num_groups=32,
        )
        scheduler = DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": "v_prediction" if sd2 else "epsilon"},
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, width)), tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        tokenizer = tiny_tokenizer(folder / "tokenizer")
        tokenizer_2 = tiny_tokenizer(folder / "tokenizer_2", pad_token="!")
        time_dim, proj = 8, 32
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=time_dim * 6 + proj, cross_attention_dim=64, norm_num_groups=32,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, 32, proj)),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        )
    raise ValueError(f"unknown pipeline kind {kind!r}: expected sd1, sd2 or sdxl")


def main(argv: list[str] | None = None) -> None:
    """python -m prompt2prompt.testing KIND FOLDER: save a tiny random pipeline (sd1, sd2 or sdxl) to FOLDER."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Save a tiny random Stable Diffusion pipeline (for trying the "
                                     "tool and for tests; its pictures are noise).")
    parser.add_argument("kind", choices=["sd1", "sd2", "sdxl"], help="architecture family")
    parser.add_argument("folder", help="where to save the pipeline")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_pipeline(args.kind, tmp).save_pretrained(args.folder)
    print(f"saved a tiny random {args.kind} pipeline to {args.folder}")


if __name__ == "__main__":
    main()
