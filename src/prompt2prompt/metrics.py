"""Image (and latent) measures of the evaluator, edit measures, inversion and the benchmarks: one definition each."""

from __future__ import annotations

import numpy as np
from PIL import Image

MSE_FLOOR = 1e-10  # identical images score 10 * log10(1 / MSE_FLOOR) = 100 dB rather than infinity


def as_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """(h, w, 3) float64 in [0, 1] from a PIL image or an array already in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return np.asarray(image, dtype=np.float64)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images (optionally only where the (h, w) mask is true)."""
    err = (as_float(a) - as_float(b)) ** 2
    err = err[mask] if mask is not None else err
    mse = float(err.mean()) if err.size else 0.0
    return float(10 * np.log10(1.0 / max(mse, MSE_FLOOR)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    return float((a & b).sum() / max(1, (a | b).sum()))


def relative_change(a, b) -> float:
    """|b - a| / |a| of two tensors (the latent drift of an edited prompt from its source), in float32."""
    a, b = a.float(), b.float()
    return float((b - a).norm() / a.norm().clamp_min(1e-12))
