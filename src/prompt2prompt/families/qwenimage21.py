"""Qwen-Image 2.1: a single-stream MM-DiT over one sequence, the text (a Qwen3-VL's last decoder layer over the prompt
inside a chat template, the system turn dropped) then the image's tokens (one per 16x16-pixel latent cell,
unpatched). Attention is block-causal: text tokens attend causally and never to the image, image tokens to every
token. Text tokens are modulated as at t = 0, so their keys and values do not change over the steps: the pipeline
computes them at the first step and caches them (`QwenImage21KVCache`); later steps' attention calls get the image's
queries alone, against the cached text keys and the image's own. Classifier-free guidance is two transformer calls a
step (each with its own cache), the conditional first. The autoencoder draws four channels (RGBA).

Attention control reads and changes only the image queries' rows, as everywhere: their softmax over the text keys
(cross-attention) and over the image keys (self-attention). On a step that computes the text's rows too (the first,
or every step without the cache), the adapter computes those causal rows itself (`project`) and puts them in front of
the image's (`finish`); the engine sees the image queries only (`joint.JointRoutedProcessor._controlled`: queries
the keys' last tokens). Text-to-image only: condition images (the pipeline's `image=`) are refused under control.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import Family
from .flux import FluxLatents
from .latents import CFG_FLOWEDIT, FlowLatents, linear_sigmas
from .qwenimage import QwenImageConcepts, QwenImageLatents, guidance


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens as `_get_qwen_prompt_embeds` keeps them: the text-to-image template read whole (no cut: the
    pipeline has no maximum length), its first `_drop_idx` tokens (the system turn) dropped, not padded (the batch
    is padded to its longest: `tokens.batch_tokens`)."""
    from ..tokens import PromptTokens

    tokenizer, skip = pipe.processor.tokenizer, pipe._drop_idx
    unlimited = int(1e9)  # no truncation: the tokenizer reads the whole template
    return PromptTokens.from_template(tokenizer, " " if not prompt else prompt, pipe.prompt_template_t2i.format,
                                      unlimited, skip, padded=False, max_tokens=unlimited)


def size(pipe):
    """The pipeline's default: its `output_resolution` (1024 pixels a side in diffusers 0.42) for a square; rotary
    positions set no largest size."""
    import inspect

    side = inspect.signature(type(pipe).__call__).parameters["output_resolution"].default
    return (side, side), None


def multiple(pipe) -> int:
    """The pipeline rounds sides down to vae_scale_factor * 2 (an image slot of its encoder is 2x2 latent cells)."""
    return int(pipe.vae_scale_factor) * 2


def sigmas(pipe, steps: int):
    """The noise levels of `steps` steps: the checkpoint's own `sample_sigmas` where its config sets that many (the
    pipeline draws with those whatever num_inference_steps says), else 1 down to 1 / steps evenly (its default)."""
    own = pipe.config.get("sample_sigmas")
    return [float(s) for s in own] if own and len(own) == steps else [float(s) for s in linear_sigmas(steps)]


def sampling(pipe, steps: int) -> dict:
    """The pipeline's `sigmas`: `steps` steps whatever its config's `sample_sigmas` (`sigmas`)."""
    return {"sigmas": sigmas(pipe, steps)}


def noise(pipe, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal latents (1, channels, h, w) as a sequence (1, h * w, channels), as the pipeline draws and packs
    them (`prepare_latents`, `_pack_latents`)."""
    factor = pipe.vae_scale_factor
    shape = (1, pipe.transformer.config.in_channels, height // factor, width // factor)
    return pipe._pack_latents(torch.randn(shape, generator=generator, dtype=torch.float32), *shape)


def grid(net, sample, kwargs, cache):
    """`img_shapes` holds each image's (frames, rows, columns), the generated image last."""
    _, rows, columns = kwargs["img_shapes"][0][-1]
    return (rows, columns), (rows, columns)


def project(attn, call: dict, text_tokens: int, grid):
    """QwenImage21AttnProcessor's projections, qk-norms, complex rotary embeddings and cache bookkeeping (keys and
    values of the text stored at the cache's first step, read in front of the image's later). Returns the image's
    queries only; on a step whose call holds the text too, the text's causal rows are computed here, with the padding
    mask, and kept in call["_text_out"] for `finish`."""
    from diffusers.models.transformers.transformer_qwenimage21 import apply_rotary_emb_qwen

    from ..errors import P2PError

    hidden = call["hidden_states"]  # (batch, tokens, width): text and image, or the image alone (cached text)
    head_dim = attn.inner_dim // attn.heads
    query, key, value = (proj(hidden).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    query, key = attn.norm_q(query).to(value.dtype), attn.norm_k(key).to(value.dtype)  # (batch, tokens, heads, d)
    rotary = call.get("rotary_emb")
    if rotary is not None:
        query, key = (apply_rotary_emb_qwen(x, rotary, use_real=False) for x in (query, key))
    cache, mode, written = call.get("layer_cache"), call.get("kv_cache_mode"), call.get("cache_write_slice")
    if cache is not None and mode == "extract" and written is not None:
        cache.store(key[:, written].clone(), value[:, written].clone())
    elif cache is not None and mode == "cached":
        cached_key, cached_value = cache.get()
        key, value = torch.cat([cached_key, key], 1), torch.cat([cached_value, value], 1)
    length, images = key.shape[1], grid[0] * grid[1]
    text = length - images
    mask = call.get("key_valid")  # (batch, tokens) bool on a step with the text; else (batch, 1, 1, tokens)
    if mask is None and call.get("attention_mask") is not None:
        mask = call["attention_mask"][:, 0, 0, :]
    if mask is not None:
        call["_key_mask"] = mask.bool()
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (batch, heads, tokens, head_dim)
    segments = call.get("segments")
    if segments is not None:  # the text's rows are in this call: causal, over the text keys alone
        if any(not is_text for _, _, is_text in segments) or (segments and segments[-1][1] != text):
            raise P2PError("attention control on Qwen-Image 2.1 reads text-to-image generation; this call holds "
                           "condition images in its sequence")
        causal = torch.ones(text, text, dtype=torch.bool, device=query.device).tril()  # (text queries, text keys)
        allowed = causal if mask is None else causal & mask.bool()[:, None, None, :text]
        call["_text_out"] = F.scaled_dot_product_attention(query[:, :, :text], key[:, :, :text], value[:, :, :text],
                                                           attn_mask=allowed)  # (batch, heads, text, head_dim)
        query = query[:, :, text:]
    return query, key, value, slice(0, text), slice(text, length)


def finish(attn, out, call: dict, text: slice, image: slice):
    """out (batch, image tokens, width), behind the text's rows where this call computed them."""
    before = call.get("_text_out")
    if before is not None:
        out = torch.cat([before.transpose(1, 2).flatten(2).to(out.dtype), out], 1)
    return attn.to_out[1](attn.to_out[0](out))


def inputs(args: tuple, kwargs: dict, prompts: int | None) -> tuple:
    """The transformer's latents, its batch, and the text's tokens (the prompt embeddings' length: text-to-image)."""
    from ..errors import P2PError

    sample = kwargs.get("hidden_states", args[0] if args else None)
    if len(kwargs.get("img_shapes", [[None]])[0]) > 1:  # condition images' shapes before the generated one's
        raise P2PError("attention control on Qwen-Image 2.1 reads text-to-image generation; this call has condition "
                       "images")
    return sample, sample.shape[0], kwargs["encoder_hidden_states"].shape[1]


class _Rows:
    """A layer's text cache read at some rows of the batch (the concept stream reads the conditional rows)."""

    def __init__(self, cache, rows: slice):
        self.cache, self.rows = cache, rows

    def get(self):
        key, value = self.cache.get()
        return key[self.rows], value[self.rows]


class QwenImage21Concepts(QwenImageConcepts):
    """Qwen-Image 2.1's concept stream (`concepts.py`). One set of weights serves the text and the image tokens, so a
    concept is carried as a prompt's token is: its Qwen3-VL embedding through `txt_in`, then through every block with
    the text's modulation (the t = 0 row where the model modulates the text from t = 0, `causal_condition`), its
    norms, projections and feed-forward. A concept gets no rotary embedding (it has no place in the prompt); it
    attends to the image tokens and the concepts. The image's own attention output keeps the padding mask. Encoded
    and listed as Qwen-Image's (`encode`, `blocks`, every block)."""

    @staticmethod
    def start(net, embeds: torch.Tensor) -> torch.Tensor:
        return net.txt_in(embeds)

    @staticmethod
    def step(block, call: dict, rows: slice, stream: torch.Tensor, read: bool, grid):
        from ..concepts import concept_attention, merge_heads

        modulation, target = call["modulation"], call.get("target_token_mask")
        text_rows = modulation[-1:] if target is not None else modulation[rows]  # the text's: t = 0, or its row's
        first, second = text_rows.chunk(2, dim=-1)
        normed = block._modulate(block.img_norm1(call["hidden_states"]), modulation.chunk(2, dim=-1)[0], target)[0]
        cache, mode = call.get("layer_cache"), call.get("kv_cache_mode")
        mask = call.get("key_valid")
        mask = mask if mask is not None or call.get("attention_mask") is None else call["attention_mask"][:, 0, 0]
        projected = {"hidden_states": normed[rows], "rotary_emb": call.get("rotary_emb"),
                     "layer_cache": _Rows(cache, rows) if cache is not None and mode == "cached" else None,
                     "kv_cache_mode": mode if mode == "cached" else None,
                     "key_valid": None if mask is None else mask[rows]}
        q, k, v, _, image = project(block.attn, projected, 0, grid)  # every query: no segments given
        attn, head_dim = block.attn, block.attn.inner_dim // block.attn.heads
        normed_stream, gate = block._modulate(block.img_norm1(stream), first, None)
        cq, ck, cv = (proj(normed_stream).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck, cv = (x.transpose(1, 2) for x in (attn.norm_q(cq), attn.norm_k(ck), cv))  # (rows, heads, concepts, d)
        c_out, maps = concept_attention(q, k, v, image, cq, ck, cv, read, projected.get("_key_mask"))
        stream = stream + gate.tanh() * attn.to_out[1](attn.to_out[0](merge_heads(c_out)))
        normed_stream, gate = block._modulate(block.img_norm2(stream), second, None)
        return stream + gate.tanh() * block.img_mlp(normed_stream), maps


def _over_white(rgba: torch.Tensor) -> torch.Tensor:
    """(n, 4, H, W) in [-1, 1] -> (n, 3, H, W) in [-1, 1]: the colour composited over white by its alpha."""
    colour, alpha = (rgba[:, :3] + 1) / 2, ((rgba[:, 3:4] + 1) / 2).clamp(0, 1)
    return (colour * alpha + (1 - alpha)) * 2 - 1


class QwenImage21Latents(FlowLatents):
    """Qwen-Image 2.1's real-image side: an RGBA video autoencoder (one frame; an image is read opaque, a drawn one
    composited over white) whose latents are normalised by its `latents_mean` / `latents_std`, a sequence of latent
    cells (`_pack_latents`), the pipeline's noise levels (`sigmas`) shifted by the cell count, and true
    classifier-free guidance: two calls, uncond + g (cond - uncond), as its loop does (no rescaling, unlike
    Qwen-Image's). Each velocity call computes the text anew (no cache)."""

    pack = staticmethod(FluxLatents.pack)  # the pipeline's own `_pack_latents`

    @staticmethod
    def encode(pipe, x):
        rgba = torch.cat([x, torch.ones_like(x[:, :1])], 1)  # opaque
        return QwenImageLatents.encode(pipe, rgba)  # Qwen-Image's codec: one frame, normalised

    @staticmethod
    def decode(pipe, latent):
        return _over_white(QwenImageLatents.decode(pipe, latent))

    @staticmethod
    def unpack(pipe, latent, shape):
        return latent.transpose(1, 2).reshape(latent.shape[0], latent.shape[2], shape[-2], shape[-1])

    @staticmethod
    def tokens(pipe, shape) -> int:
        return shape[-2] * shape[-1]

    @classmethod
    def timesteps(cls, pipe, config, steps, shape) -> dict:
        from ..flow import shift_mu

        return {"sigmas": sigmas(pipe, steps), "mu": shift_mu(config, cls.tokens(pipe, shape))}

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        guided = guidance > 1
        with torch.no_grad(), exclusive(pipe):  # the negative prompt " " as the family's guidance passes it
            texts = [pipe.encode_prompt(prompt=p, device=device) for p in ([prompt, " "] if guided else [prompt])]
        shapes = [[(1, shape[-2], shape[-1])]]
        slots = shape[-2] * shape[-1] // 4  # one encoder image slot per 2x2 latent cells, after the text

        @torch.no_grad()
        def v(x, t):  # x: (1, cells, channels); the transformer answers for the text too: the image's rows kept
            timestep = (t.to(device).expand(x.shape[0]) / 1000).to(x.dtype)
            cond, *uncond = (net(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                                 encoder_hidden_states_mask=mask, img_shapes=shapes,
                                 img_mask=torch.cat([pads, pads.new_ones(pads.shape[0], slots)], 1),
                                 return_dict=False)[0][:, -x.shape[1]:] for embeds, mask, pads in texts)
            return cond if not uncond else uncond[0] + guidance * (cond - uncond[0])

        return v


# Qwen-Image 2.1's system line (the pipeline's `sys_prompt`), one token a word here
SYSTEM_WORDS = tuple("Comprehend and analyze the provided prompt .".split())
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen-VL's chat format (a message's content a string or a list of typed parts; written here, not copied): what the
# pipeline's processor reads for the system turn it drops
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen3_vl(folder: Path, width: int, layers: int, head_dim: int, mrope: list[int],
                  extra_words: tuple[str, ...] = ()) -> tuple:
    """(processor, text encoder): a tiny Qwen3-VL (`layers` text layers of this width; a one-layer vision tower never
    run) and its processor's text half (`standins.TextProcessor`: Qwen3VLProcessor needs torchvision here), whose
    tokenizer (with Qwen-VL's chat template and vision tokens) and image-processor settings are saved to folder."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from ..standins import TextProcessor, _settings
    from ..testing import tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(folder, extra_words)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    Qwen2VLImageProcessorPil(patch_size=4, merge_size=1).save_pretrained(str(folder))
    processor = TextProcessor(tokenizer, "Qwen3VLProcessor needs torchvision (its video processor)",
                              _settings(folder))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), VISION_TOKENS)}
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width, patch_size=4,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return processor, Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


def tiny(folder: Path):
    """A 2-layer Qwen3-VL (a one-layer vision tower the pipeline never runs), its processor's text half
    (`standins.TextProcessor`: Qwen3VLProcessor needs torchvision here) saved as a Qwen3VLProcessor folder, a
    2-block transformer over 4-channel latent cells and a 16x RGBA autoencoder: 64x64 images, 4x4 image tokens."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    width = 32
    processor, text_encoder = tiny_qwen3_vl(folder / "processor", width, layers=2, head_dim=16,
                                            mrope=[2, 3, 3], extra_words=SYSTEM_WORDS)
    transformer = QwenImage21Transformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=2, context_in_dim=width,
                                                axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False] * 4, latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=0.9)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)
    pipe.register_to_config(processor=("transformers", "Qwen3VLProcessor"))  # saved as the checkpoint names it
    return pipe


class QwenImage21(Family):
    tokens = staticmethod(tokens)
    size = staticmethod(size)
    multiple = staticmethod(multiple)
    sampling = staticmethod(sampling)
    guidance = staticmethod(guidance)
    noise = staticmethod(noise)
    inputs = staticmethod(inputs)
    grid = staticmethod(grid)
    project = staticmethod(project)
    finish = staticmethod(finish)
    tiny = staticmethod(tiny)

    tiny_side = 128  # 8x8 image tokens of 16 pixels

    def place(self, name: str) -> str:
        return "single"  # every block: text and image in one sequence


QWEN_IMAGE_21 = QwenImage21("qwenimage21", "Qwen-Image 2.1", "joint", pipelines=("QwenImage21Pipeline",),
                            networks=("QwenImage21Transformer2DModel",), packed=True, flow=True,
                            processors=("QwenImage21AttnProcessor",), guidance_calls=True, batch_padded=True,
                            scale=("true_cfg_scale", 0.0),
                            arguments=("attn", "hidden_states", "attention_mask", "rotary_emb", "layer_cache",
                                       "kv_cache_mode", "cache_write_slice", "segments", "key_valid"),
                            concepts=QwenImage21Concepts, latents=QwenImage21Latents, flowedit=CFG_FLOWEDIT)
FAMILIES = (QWEN_IMAGE_21,)
