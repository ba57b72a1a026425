"""Stable Diffusion 1.x, 2.x and XL: UNets with cross-attention layers to the text (`attention.py` routes them)."""

from __future__ import annotations

from . import Family


def load(index: dict) -> dict:
    """No safety checker (a research tool looks at every image; diffusers warns unless it is named)."""
    return {"safety_checker": None, "requires_safety_checker": False}


SD1 = Family("sd1", "Stable Diffusion 1.x", "unet", pipelines=("StableDiffusionPipeline",),
             networks=("UNet2DConditionModel",), load=load)
SD2 = Family("sd2", "Stable Diffusion 2.x", "unet", pipelines=("StableDiffusionPipeline",), load=load)
SDXL = Family("sdxl", "Stable Diffusion XL", "unet", pipelines=("StableDiffusionXLPipeline",), pooled=True,
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
