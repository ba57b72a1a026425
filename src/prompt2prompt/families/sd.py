"""Stable Diffusion 1.x, 2.x and XL: UNets with cross-attention layers to the text (`attention.py` routes them)."""

from __future__ import annotations

from pathlib import Path

from . import Family


def load(index: dict) -> dict:
    """No safety checker (a research tool looks at every image; diffusers warns unless it is named)."""
    return {"safety_checker": None, "requires_safety_checker": False}


def tiny(folder: Path, sd2: bool = False):
    """SD 1.x (epsilon, 32-wide text) or SD 2.x (v-prediction, linear projections, a wider text encoder, "!"
    padding): UNet latents 16x16 for 32x32 images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..shapes.model import SD_SCHEDULE
    from ..testing import clip_config, tiny_tokenizer, tiny_vae

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
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(tokenizer, width)), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_xl(folder: Path):
    """SDXL: two text encoders, added time/text conditioning."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..shapes.model import SD_SCHEDULE
    from ..testing import clip_config, tiny_tokenizer, tiny_vae

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
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(tokenizer, 32)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer_2, 32, proj)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """One CLIP sequence (SDXL's two encoders share its positions, side by side in the channels)."""
    from ..tokens import PromptTokens

    return PromptTokens.from_tokenizer(pipe.tokenizer, prompt)


class StableDiffusion(Family):
    """SD 1.x and 2.x (one pipeline class; `by_parts` tells them apart)."""

    load = staticmethod(load)
    tokens = staticmethod(tokens)

    def tiny(self, folder: Path):
        return tiny(folder, sd2=self.name == "sd2")


class StableDiffusionXL(Family):
    tokens = staticmethod(tokens)
    tiny = staticmethod(tiny_xl)


SD1 = StableDiffusion("sd1", "Stable Diffusion 1.x", "unet", pipelines=("StableDiffusionPipeline",),
                      networks=("UNet2DConditionModel",))
SD2 = StableDiffusion("sd2", "Stable Diffusion 2.x", "unet", pipelines=("StableDiffusionPipeline",))
SDXL = StableDiffusionXL("sdxl", "Stable Diffusion XL", "unet", pipelines=("StableDiffusionXLPipeline",), pooled=True,
                         added_conditions=True)
FAMILIES = (SD1, SD2, SDXL)


def by_parts(pipe) -> Family | None:
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        return None
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    # SD 2.x: v-prediction (768 px models) or OpenCLIP's 1024-wide text
    v_pred = pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    return SD2 if v_pred or pipe.text_encoder.config.hidden_size >= 1024 else SD1
