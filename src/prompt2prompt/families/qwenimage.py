"""Qwen-Image: an MM-DiT of double-stream blocks only (text then image in one joint attention each), whose text is a
Qwen2.5-VL's last hidden layer over the prompt inside a fixed template, with the template's opening dropped (the
denoiser sees the prompt's tokens first, then the template's closing); each call's texts are padded to the longest of
them, the padding masked out of the attention. Latents are packed into 2x2-patch tokens; classifier-free guidance
("true CFG") is two transformer calls a step, the conditional first. Real-image inversion is not supported on it yet.
"""

from __future__ import annotations

import torch

from . import Family
from .flux import noise


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens as `_get_qwen_prompt_embeds` keeps them: the template's first
    `prompt_template_encode_start_idx` tokens dropped, cut at max_sequence_length, not padded (the batch is padded
    to its longest: `tokens.batch_tokens`)."""
    from ..tokens import PromptTokens, sequence_length

    skip = pipe.prompt_template_encode_start_idx
    length = sequence_length(pipe, max_sequence_length)
    return PromptTokens.from_template(pipe.tokenizer, prompt, pipe.prompt_template_encode.format, length, skip,
                                      padded=False, max_tokens=pipe.tokenizer_max_length + skip)


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """True classifier-free guidance: `true_cfg_scale` with a negative prompt, " " by default (what diffusers'
    QwenImagePipeline documents as enabling it); guidance_scale is left out (it is for guidance-distilled models)."""
    if scale <= 1:
        return {"true_cfg_scale": 1.0}
    return {"true_cfg_scale": scale, "negative_prompt": [negative_prompt or " "] * prompts}


def grid(net, sample, kwargs, cache):
    """(batch, tokens, channels) packed latents; `img_shapes` holds each image's (frames, rows, columns)."""
    _, rows, columns = kwargs["img_shapes"][0][0]
    return (rows, columns), (rows, columns)


def project(attn, call: dict, text_tokens: int, grid):
    """QwenDoubleStreamAttnProcessor2_0's projections, qk-norms and complex rotary embeddings; text then image.
    Padded text keys (`encoder_hidden_states_mask`) are left in `call["_key_mask"]`."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    hidden_states, encoder_hidden_states = call["hidden_states"], call["encoder_hidden_states"]
    head_dim = attn.inner_dim // attn.heads
    image = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    text = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]  # (batch, tokens, heads, head_dim)
    for streams, norms in ((image, (attn.norm_q, attn.norm_k)), (text, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                streams[i] = norm(streams[i])
    rotary = call.get("image_rotary_emb")
    if rotary is not None:
        image_freqs, text_freqs = rotary
        for streams, freqs in ((image, image_freqs), (text, text_freqs)):
            streams[0], streams[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False) for x in streams[:2])
    t = encoder_hidden_states.shape[1]
    mask = call.get("encoder_hidden_states_mask")
    if mask is not None:
        ones = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        call["_key_mask"] = torch.cat([mask.bool(), ones], 1)  # (batch, tokens)
    query, key, value = (torch.cat([a, b], 1).transpose(1, 2) for a, b in zip(text, image))  # (b, heads, tokens, d)
    return query, key, value, slice(0, t), slice(t, query.shape[2])


def finish(attn, out, call: dict, text: slice, image: slice):
    image_out = attn.to_out[0](out[:, image].contiguous())
    if len(attn.to_out) > 1:
        image_out = attn.to_out[1](image_out)
    return image_out, attn.to_add_out(out[:, text].contiguous())


QWEN_IMAGE = Family("qwenimage", "Qwen-Image", "joint", pipelines=("QwenImagePipeline",),
                    networks=("QwenImageTransformer2DModel",), text_first=True, packed=True, flow=True,
                    text_parts=("qwen2.5-vl",), processors=("QwenDoubleStreamAttnProcessor2_0",), invertible=False,
                    guidance_calls=True, batch_padded=True, scale=("true_cfg_scale", 0.0),
                    arguments=("attn", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                               "attention_mask", "image_rotary_emb"),
                    tokens=tokens, noise=noise, grid=grid, project=project, finish=finish, guidance=guidance)
FAMILIES = (QWEN_IMAGE,)
