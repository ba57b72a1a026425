"""The bundled models' architectures, sized for 64x64 images of the shapes world: Stable Diffusion 1.x's components
(`shapes`: a UNet) and Stable Diffusion 3's (`shapes-flow`: an MM-DiT trained by flow matching)."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


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
    text_width: int = 128  # CLIP text encoder hidden size = UNet cross_attention_dim (sd3: each of its two CLIPs)
    text_layers: int = 2  # (sd3 reads the penultimate layer's states, as SD3 does: give it one more)
    text_heads: int = 4
    transformer_layers: int = 6  # sd3: joint (MM-DiT) blocks
    transformer_heads: int = 4  # sd3: attention heads; width = heads * head_dim
    transformer_head_dim: int = 32
    patch_size: int = 2  # sd3: latent pixels per token side: 16x16 latents give an 8x8 grid of image tokens
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


def build_transformer(cfg: ShapesModelConfig) -> SD3Transformer2DModel:
    """SD3's MM-DiT: the two CLIPs' states side by side (2 * text_width features) are its text tokens; their pooled
    outputs side by side its pooled conditioning; no T5 (the pipeline then appends zero tokens, as SD3 allows)."""
    grid = cfg.image_size // 4 // cfg.patch_size
    return SD3Transformer2DModel(
        sample_size=cfg.image_size // 4,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.transformer_layers,
        attention_head_dim=cfg.transformer_head_dim,
        num_attention_heads=cfg.transformer_heads,
        joint_attention_dim=2 * cfg.text_width,
        caption_projection_dim=cfg.transformer_heads * cfg.transformer_head_dim,
        pooled_projection_dim=2 * cfg.text_width,
        pos_embed_max_size=2 * grid,  # position embeddings for up to twice the trained side (128 px images)
    )


def _clip_config(cfg: ShapesModelConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
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


def build_text_encoder(cfg: ShapesModelConfig, projection: bool = False) -> CLIPTextModel:
    """SD 1.x's CLIPTextModel, or (projection=True) the CLIPTextModelWithProjection SD3 takes twice."""
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(_clip_config(cfg))


# SD 1.x's noise schedule (CompVis v1-inference.yaml / the scheduler config of runwayml/stable-diffusion-v1-5).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def _schedule(prediction: str, zero_snr: bool) -> dict:
    if zero_snr and prediction != "v_prediction":  # at zero SNR the last step's noise is the input: nothing to learn
        raise ValueError(f"a zero terminal SNR schedule needs v_prediction, got prediction {prediction!r}")
    return {**SD_SCHEDULE, "prediction_type": prediction, "rescale_betas_zero_snr": zero_snr}


def build_train_scheduler(prediction: str = "epsilon", zero_snr: bool = False) -> DDPMScheduler:
    return DDPMScheduler(**_schedule(prediction, zero_snr), clip_sample=False)


def build_scheduler(prediction: str = "epsilon", zero_snr: bool = False) -> DDIMScheduler:
    """Sampling: DDIM with the training schedule (epsilon prediction as SD 1.x, or v-prediction as SD 2.x).

    zero_snr: the schedule rescaled so its last step is pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed"), sampled with their "trailing" timesteps, so sampling starts at that last step."""
    spacing = {"timestep_spacing": "trailing"} if zero_snr else {"steps_offset": 1}
    return DDIMScheduler(**_schedule(prediction, zero_snr), clip_sample=False, set_alpha_to_one=False, **spacing)


# Flow matching as SD3 trains it (Esser et al. 2024, "Scaling Rectified Flow Transformers"): x_s = (1 - s) x_0 + s e,
# the network predicts e - x_0 at timestep 1000 s. No resolution shift: the grid is 8x8 tokens, far below the 1024 px
# that SD3's shift of 3.0 was chosen for.
FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0)


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE)
