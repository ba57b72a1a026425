"""Reading images: the size checked before any pixel is decoded, every mode turned into 8-bit RGB as it looks.

`read_image` opens a file lazily, refuses it when it has more than `MAX_PIXELS` pixels (a decompression bomb takes
gigabytes once decoded), applies the EXIF rotation, and converts high-bit-depth modes by scaling (a 16-bit PNG would
otherwise clip to white). `prepare_image` then crops and resizes for a model.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 40_000_000  # an image with more pixels than this is refused before decoding (about 8000 x 5000)
MAX_UPSCALE = 4  # an image is refused when inverting it would enlarge it more than this (it would invent detail)


def _to_8bit(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit modes as they are; 16-bit and 32-bit integer and float greys scaled to 0..255. Returns (image, note)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0  # 16-bit PNGs open as I;16 or I
        return Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L"), \
            f"{mode} image: {16 if top > 255 else 8}-bit values scaled to 8 bits"
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        bad = int((~np.isfinite(values)).sum())
        if bad:  # NaN or infinite pixels have no brightness to scale: refused, not made black
            raise InputError(f"the floating-point image has {bad:,} of {values.size:,} pixels NaN or infinite; "
                             "expected finite values (0..1 or 0..255)")
        top = 1.0 if values.max() <= 1.0 else 255.0
        return Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L"), \
            f"floating-point image: values 0..{top:g} scaled to 8 bits"
    return image, None


_PIL_LIMIT = threading.Lock()


@contextmanager
def _header_only():
    """Pillow's own pixel limit lifted while a header is read (this module checks the size itself, before decoding,
    and says what it found); restored at once."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image(image: str | Path | Image.Image, notes: list[str] | None = None, max_pixels: int = MAX_PIXELS,
               label: str | None = None) -> Image.Image:
    """An image file (any format PIL reads, EXIF rotation applied, at most max_pixels pixels, checked before
    decoding) or a PIL image, in an 8-bit mode; a clear error otherwise. notes receives a line per conversion;
    label names the file in messages (default: its path)."""
    notes = [] if notes is None else notes
    if isinstance(image, Image.Image):
        converted, note = _to_8bit(image)
        notes += [note] if note else []
        return converted
    path = Path(image)
    name = label or str(path)
    if not path.is_file():
        raise InputError(f"no image file at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _header_only():
                im = Image.open(path)  # reads the header: the size, before any pixel is decoded
            with im:
                width, height = im.size
                if width * height > max_pixels:
                    raise InputError(f"{name} is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted "
                                     "(it is refused before decoding)")
                image = ImageOps.exif_transpose(im)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} is too large to decode safely ({e}); at most {max_pixels:,} pixels are "
                         "accepted") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"cannot read {name} as an image ({e}); expected a PNG, JPEG or another image") from None
    converted, note = _to_8bit(image)
    notes += [note] if note else []
    return converted


def prepare_image(image: str | Path | Image.Image, size: tuple[int, int],
                  offsets: tuple[int, int, int, int] = (0, 0, 0, 0), notes: list[str] | None = None,
                  purpose: str = "inverting") -> Image.Image:
    """Any image file or PIL image, any mode: offsets cut, centre-cropped to size's aspect, resized to size (h, w).

    notes: if given, receives one line per conversion done (bit depth, mode, transparency, crop, resize). An image
    that would have to be enlarged more than MAX_UPSCALE times is refused (purpose: what the size is for, in that
    sentence: "inverting", "editing").
    """
    notes = [] if notes is None else notes
    image = read_image(image, notes)
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
        notes.append(f"{mode} image: transparent pixels composited on white")
    elif mode != "RGB":
        notes.append(f"converted from mode {mode} to RGB")
    image = image.convert("RGB")
    left, right, top, bottom = offsets
    w, h = image.size
    if left + right >= w or top + bottom >= h:
        raise InputError(f"offsets {offsets} leave nothing of a {w}x{h} image")
    image = image.crop((left, top, w - right, h - bottom))
    w, h = image.size
    scale = max(size[0] / h, size[1] / w)  # ImageOps.fit scales the cropped part up or down by this at least
    if scale > MAX_UPSCALE:
        cut = " (after offsets)" if any(offsets) else ""
        raise InputError(f"the image is {w}x{h} pixels{cut}; {purpose} it at {size[1]}x{size[0]} would "
                         f"enlarge it {scale:.1f} times (at most {MAX_UPSCALE} is allowed): expected at least "
                         f"{-(-size[1] // MAX_UPSCALE)}x{-(-size[0] // MAX_UPSCALE)} pixels")
    if (w, h) != (size[1], size[0]):
        notes.append(f"centre-cropped and resized from {w}x{h} to {size[1]}x{size[0]}")
    return ImageOps.fit(image, (size[1], size[0]), Image.LANCZOS)
