"""The bundled model's architecture: Stable Diffusion's components, sized for 64x64 images of the shapes world."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


@dataclass(frozen=True)
class ShapesModelConfig:
    image_size: int = 64  # pixels; the VAE maps it to image_size // 4 latents
    latent_channels: int = 4  # as in SD
    vae_channels: tuple[int, ...] = (16, 32, 64)  # one entry per VAE level: two downsamples, 64 -> 16
    unet_channels: tuple[int, ...] = (32, 64, 128)  # UNet levels at 16x16, 8x8, 4x4 latents
    unet_layers_per_block: int = 1
    unet_head_dim: int = 16  # channels per attention head
    unet_norm_groups: int = 8  # GroupNorm groups; >= 2 channels per group, or the output cannot carry a mean (DC) shift
    cross_attention_levels: tuple[bool, ...] = (True, True, False)  # cross-attention at 16x16 and 8x8 (and the mid)
    text_width: int = 128  # CLIP text encoder hidden size = UNet cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    vocab_size: int = 651  # rows of the token embedding; set from the tokenizer
    max_length: int = 77  # tokenizer.model_max_length


def build_vae(cfg: ShapesModelConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: ShapesModelConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=tuple(c // cfg.unet_head_dim for c in cfg.unet_channels),  # = number of heads
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_text_encoder(cfg: ShapesModelConfig) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


# SD 1.x's noise schedule (CompVis v1-inference.yaml / the scheduler config of runwayml/stable-diffusion-v1-5).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def build_train_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(**{**SD_SCHEDULE, "prediction_type": prediction}, clip_sample=False)


def build_scheduler(prediction: str = "epsilon") -> DDIMScheduler:
    """Sampling: DDIM with the training schedule (epsilon prediction as SD 1.x, or v-prediction as SD 2.x)."""
    return DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": prediction}, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)
