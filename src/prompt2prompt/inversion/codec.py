"""The latent codec: an image to the latent the pipeline's denoiser sees and back, and the latent layout of the
pipeline's loop, by the family's codec (`families/latents.py`).
"""

from __future__ import annotations

import torch
from PIL import Image

from ..families import family_of
from ..routing import execution_device


def image_to_tensor(pipe, image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1], by the pipeline's own image processor (as the family's codec reads it)."""
    return _codec(pipe).image(pipe, image)


def tensor_to_image(pipe, x: torch.Tensor) -> Image.Image:
    return pipe.image_processor.postprocess(x.float().cpu(), output_type="pil")[0]


def _codec(pipe):
    """The family's latent codec and layouts (`families/latents.py`); DDIM-family models use the generic one."""
    from ..families.latents import FlowLatents

    return family_of(pipe).latents or FlowLatents


@torch.no_grad()
def encode(pipe, image: Image.Image) -> torch.Tensor:
    """The image's latent as the pipeline's denoiser sees it, in the image layout (1, channels, h, w): SD's
    (mean - shift_factor) * scaling_factor, or the family's own codec."""
    x = image_to_tensor(pipe, image).to(execution_device(pipe), pipe.vae.dtype)
    return _codec(pipe).encode(pipe, x)


@torch.no_grad()
def decode(pipe, latent: torch.Tensor) -> Image.Image:
    return tensor_to_image(pipe, _codec(pipe).decode(pipe, latent))


def pack(pipe, latent: torch.Tensor) -> torch.Tensor:
    """Latents (n, channels, h, w) in the layout the pipeline's loop holds them (Flux's packed token sequence)."""
    return _codec(pipe).pack(pipe, latent)


def unpack(pipe, latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`pack` undone for an image of size (width, height) in pixels."""
    cell = _codec(pipe).cell(pipe)
    return _codec(pipe).unpack(pipe, latent, (size[1] // cell, size[0] // cell))


def autoencoder_reconstruction(pipe, image: Image.Image) -> Image.Image:
    """The best any inversion can do: the autoencoder's own reconstruction."""
    return decode(pipe, encode(pipe, image))
