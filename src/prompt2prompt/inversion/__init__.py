"""Real images: DDIM inversion and null-text inversion (Mokady et al. 2022), rectified-flow inversion (`flow.py`),
saved to one file and edited from.

- `record.py`: the inversion file: `Inversion`, `InversionOptions` and the method names, the file written and read
  back with every field checked (`is_inversion_file`, `check_file`), and the checks that an inversion fits a caption
  and a pipeline (`inversion_model`, `check_inversion`).
- `codec.py`: the latent codec: images to the latents the denoiser sees and back, and the loop's layouts (`encode`,
  `decode`, `pack`, `unpack`, `autoencoder_reconstruction`).
- `ddim.py`: `invert`, the entry point (DDIM-family methods here, flow methods in `flow.py`; its docstring lists
  every method), and the DDIM, null-text, negative-prompt and direct inversions.
- `sampling.py`: sampling back from an inversion as it was made (`sampler`, `sampling_kwargs`, `sampling_options`,
  `sample_back`).

Every name is re-exported here: `from prompt2prompt.inversion import X` reaches each of them.
"""

from ..flow import FLOW_METHODS
from ..images import prepare_image
from ..metrics import psnr
from .codec import autoencoder_reconstruction, decode, encode, image_to_tensor, pack, tensor_to_image, unpack
from .ddim import _DDIM, ddim_scheduler, invert  # noqa: F401  (_DDIM: the tests reach it here)
from .record import (
    DDIM_GUIDANCE,
    DDIM_METHODS,
    KIND,
    METHODS,
    Inversion,
    InversionOptions,
    check_file,
    check_inversion,
    inversion_model,
    is_inversion_file,
)
from .sampling import sample_back, sampler, sampling_kwargs, sampling_options

__all__ = [
    "DDIM_GUIDANCE", "DDIM_METHODS", "FLOW_METHODS", "KIND", "METHODS", "Inversion", "InversionOptions",
    "autoencoder_reconstruction", "check_file", "check_inversion", "ddim_scheduler", "decode", "encode",
    "image_to_tensor", "invert", "inversion_model", "is_inversion_file", "pack", "prepare_image", "psnr",
    "sample_back", "sampler", "sampling_kwargs", "sampling_options", "tensor_to_image", "unpack",
]
