"""What real-image work on a flow-matching family needs of its adapter: the autoencoder's latent codec, the layouts
of the pipeline's latents, its grid of noise levels and one guided velocity call. Inversion (`flow.py`,
`inversion/`), FlowEdit (`flowedit.py`) and concept maps of an image (`concepts.py`) read these methods only.

Three layouts of one latent:
- the *image* layout, (1, channels, h, w), what an inversion file stores: h * `cell` pixels high;
- the *loop* layout, what the pipeline's denoising loop holds (its callbacks, its scheduler and its transformer see
  it): the image layout itself (SD3, Z-Image) or a sequence of patch tokens (Flux.1, Flux.2, Qwen-Image);
- the *input* layout, what the pipeline's `latents=` argument takes (the loop layout, except Flux.2 [klein], which
  packs its input itself).

`FlowLatents` is the generic behaviour (Stable Diffusion 3's: an autoencoder with a scaling and a shift factor, latents
as images, classifier-free guidance as one batch [unconditional, conditional]); a family's adapter subclasses it
where it differs, and names the subclass in its record (`Family.latents`). Not an adapter (no FAMILIES).
"""

from __future__ import annotations

import torch


class FlowLatents:
    @staticmethod
    def cell(pipe) -> int:
        """Pixels per latent cell of the image layout, a side."""
        return int(pipe.vae_scale_factor)

    @staticmethod
    def channels(pipe) -> int:
        """Channels of the image layout."""
        return int(pipe.transformer.config.in_channels)

    @staticmethod
    def image(pipe, image) -> torch.Tensor:
        """A PIL image -> (1, 3, H, W) in [-1, 1] at its own size, by the pipeline's image processor."""
        return pipe.image_processor.preprocess(image, height=image.height, width=image.width)

    @staticmethod
    def encode(pipe, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> the image layout as the denoiser reads it: (mean - shift) * scale."""
        config = pipe.vae.config
        return (pipe.vae.encode(x).latent_dist.mean - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    @staticmethod
    def decode(pipe, latent: torch.Tensor) -> torch.Tensor:
        """The image layout -> (1, 3, H, W) in [-1, 1]."""
        config = pipe.vae.config
        return pipe.vae.decode(latent / config.scaling_factor + (config.get("shift_factor") or 0.0)).sample

    @staticmethod
    def pack(pipe, latent: torch.Tensor) -> torch.Tensor:
        """The image layout -> the loop layout."""
        return latent

    @staticmethod
    def unpack(pipe, latent: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The loop layout -> the image layout of this shape."""
        return latent

    @classmethod
    def input(cls, pipe, latent: torch.Tensor) -> torch.Tensor:
        """The image layout -> what the pipeline's `latents=` takes."""
        return cls.pack(pipe, latent)

    @staticmethod
    def tokens(pipe, shape: tuple[int, ...]) -> int:
        """Image tokens the transformer makes of an image-layout latent of this shape (the noise levels' shift)."""
        patch = pipe.transformer.config.patch_size
        return (shape[-2] // patch) * (shape[-1] // patch)

    @classmethod
    def timesteps(cls, pipe, config, steps: int, shape: tuple[int, ...]) -> dict:
        """The keyword arguments the pipeline's loop gives its scheduler's `set_timesteps` for these latents (SD3:
        the scheduler's own noise levels, shifted by the image's token count where it shifts dynamically)."""
        from ..flow import shift_mu

        if config.get("use_dynamic_shifting"):
            return {"mu": shift_mu(config, cls.tokens(pipe, shape))}
        return {}

    @staticmethod
    def velocity(pipe, prompt: str, guidance: float, max_sequence_length: int | None, shape: tuple[int, ...]):
        """v(x, t) under the caption, x in the loop layout, t in the scheduler's timesteps (noise level times its
        training steps), guided as the pipeline's loop guides (SD3: classifier-free, one batch [uncond, cond])."""
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        guided = guidance > 1
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):  # the pipeline's lock: its tokenizers are not shared by threads
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt, prompt_3=prompt, do_classifier_free_guidance=guided, device=device,
                **kwargs)
        if guided:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])

        @torch.no_grad()
        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inp = torch.cat([x, x]) if guided else x
            out = net(hidden_states=inp, timestep=t.to(device).expand(inp.shape[0]), encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0]
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            return out

        return v


# FlowEdit's defaults (steps, n_max, source and target guidance) for a family guided by true classifier-free guidance
# that the paper published no settings for (Flux.2 [klein], Qwen-Image, Z-Image): its settings for SD3, the family
# it guides the same way (fallenshock/FlowEdit, SD3_exp.yaml), carried over untuned.
CFG_FLOWEDIT = (50, 33, 3.5, 13.5)


def linear_sigmas(steps: int):
    """1 down to 1 / steps, evenly: the noise levels the Flux and Qwen-Image pipelines give their scheduler."""
    import numpy as np

    return np.linspace(1.0, 1 / steps, steps)
