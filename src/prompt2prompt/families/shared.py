"""Helpers several family adapters share: a Qwen3's chat template, the text side's projections of a double-stream
attention module. (Not an adapter: it has no FAMILIES.)"""

from __future__ import annotations

import torch


def chat(tokenizer, thinking: bool):
    """content -> the chat text a Qwen3 reads for one user turn with the generation prompt (Flux.2 klein: thinking
    off; Z-Image: on)."""

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)

    return render


def text_side_qkv(attn, states: torch.Tensor):
    """The text side's queries, keys and values (rows, heads, tokens, head_dim) of a double-stream attention module
    with `add_q/k/v_proj` and `norm_added_q/k` (SD3, Qwen-Image), for prompt or concept tokens (no rotary: a concept
    has no place in the prompt)."""
    rows, head_dim = states.shape[0], attn.add_k_proj.out_features // attn.heads
    q, k, v = (proj(states).view(rows, -1, attn.heads, head_dim).transpose(1, 2)
               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v
