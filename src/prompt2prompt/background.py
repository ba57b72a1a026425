"""Real-image edits that keep the background: the input's pixels outside the local-blend mask, exactly.

Local blend keeps the source's latents outside its mask, but the autoencoder's decoder sees the whole latent (its
normalisation layers and receptive field reach across the image), so an edit inside the mask shifts pixels outside
it: on the bundled model a real image's background came out up to ~31/255 darker. A generated image has no truer
background than its decoded source; a real one does, the input itself. So for an edit from an inversion the pixels
outside the mask are taken from the input, blended over a feather band just outside the mask:

    alpha = 1 inside the mask, falling linearly to 0 at `radius` pixels outside it (chessboard distance), 0 beyond
    picture = alpha * edited + (1 - alpha) * input

so every pixel farther than `radius` from the mask is the input's, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def feathered(mask: torch.Tensor, size: tuple[int, int], radius: int) -> torch.Tensor:
    """The mask (any grid: latent or token) at pixel size (height, width), feathered outwards over radius pixels.

    mask: (n, 1, h, w) bool. Returns (n, 1, height, width) float32 in [0, 1]: 1 on the mask's pixels, (radius + 1 - d)
    / (radius + 1) at chessboard distance d <= radius from it, 0 farther.
    """
    alpha = F.interpolate(mask.float().cpu(), size=size, mode="nearest")  # (n, 1, H, W) the mask's pixels
    if radius <= 0:
        return alpha
    grown, total = alpha, alpha.clone()
    for _ in range(radius):  # the mask grown by 1, 2, ..., radius pixels: their mean falls off linearly outside it
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        total += grown
    return total / (radius + 1)


def keep_background(edited: list[Image.Image], original: Image.Image, masks: torch.Tensor, radius: int
                    ) -> tuple[list[Image.Image], torch.Tensor]:
    """Each edited image with the original's pixels outside its own mask (see the module's docstring).

    edited: one image per mask; masks: (len(edited), 1, h, w) bool. Returns the composites and their alphas
    (n, 1, height, width), 1 where the edit's pixel is kept.
    """
    width, height = original.size
    alphas = feathered(masks, (height, width), radius)
    base = np.asarray(original.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    out = []
    for image, alpha in zip(edited, alphas):
        if image.size != original.size:
            raise ValueError(f"the edit is {image.size[0]}x{image.size[1]} pixels but the input "
                             f"{width}x{height}; they must match to keep the background")
        a = alpha[0].numpy()[..., None]  # (H, W, 1)
        mixed = a * np.asarray(image.convert("RGB"), dtype=np.float32) + (1 - a) * base
        out.append(Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8)))
    return out, alphas
