"""Flux.2 [dev] (`Flux2Pipeline`): Flux.2 [klein]'s transformer, latents and attention (`flux2.Flux2`), read by a
Mistral Small 3.1 text encoder (its hidden states after layers 10, 20 and 30, stacked) over the prompt inside a chat
of a fixed system turn and a user turn (`format_input`, no generation prompt; the denoiser sees every templated
position, padding included), and guidance distilled into the transformer: the scale is one of its inputs (embedded
guidance, as Flux.1 [dev]), one transformer call a step, no unconditional call and no negative prompt.

Its published checkpoint names a `PixtralProcessor` as its tokenizer, which transformers cannot build without
torchvision; the pipeline only ever calls `apply_chat_template` on it, which the processor's text tokenizer with the
chat template does alike, and `loading.load_pipeline` loads that instead where the processor cannot be built. Prompt
upsampling (`caption_upsample_temperature`, the text encoder generating a longer prompt) and image inputs are not
used here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .flux2 import Flux2, Flux2Concepts, Flux2Latents, tiny_parts

# Mistral Small 3.1's chat layout for a system turn and a user turn (written here, not copied), content given as a
# list of {"type": "text"} parts (what Flux2Pipeline's `format_input` passes) or as a string: the tiny tokenizer's
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[IMG]", "[IMG_BREAK]", "[IMG_END]")


def text_tokenizer(pipe):
    """The tokenizer that reads the text: a processor's `tokenizer` (PixtralProcessor), else the pipeline's own."""
    return getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)


class _AsTemplated:
    """A tokenizer that reads text as `apply_chat_template` does: without adding its special tokens (the rendered chat
    already holds its BOS), so a tokenizer that prepends one (Mistral's) gives the pipeline's ids."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return self._tokenizer(text, add_special_tokens=False, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def tokens(pipe, prompt: str, max_sequence_length: int | None = None):
    """The prompt's tokens inside the chat the pipeline encodes (`_get_mistral_3_small_prompt_embeds`: its system
    message, then the prompt as the user turn, no generation prompt), padded to max_sequence_length. A prompt holding
    one of the tokenizer's bracketed control tokens ([INST], [IMG], ...) is refused: it would not be read as text."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    from ..errors import PromptError
    from ..tokens import PromptTokens, sequence_length

    tokenizer = text_tokenizer(pipe)
    found = sorted(t for t in set(tokenizer.all_special_tokens) if t[:1] == "[" and t[-1:] == "]" and t in prompt)
    if found:
        raise PromptError(f"the prompt holds {', '.join(map(repr, found))}, the model's control token(s), which would "
                          "not be read as text: remove them")

    def render(content: str) -> str:
        return pipe.tokenizer.apply_chat_template(format_input([content], pipe.system_message)[0], tokenize=False,
                                                  add_generation_prompt=False)

    return PromptTokens.from_template(_AsTemplated(tokenizer), prompt, render,
                                      sequence_length(pipe, max_sequence_length))


def guidance(scale: float, negative_prompt: str | None, prompts: int) -> dict:
    """The embedded guidance scale, the pipeline's `guidance_scale`; a negative prompt is refused."""
    if negative_prompt:
        from ..errors import InputError

        raise InputError(f"Flux.2 [dev] takes no negative prompt (its guidance is distilled into the transformer as an "
                         f"input, with no unconditional call to steer); expected none, got {negative_prompt!r}")
    return {"guidance_scale": scale}


class Flux2DevLatents(Flux2Latents):
    """Flux.2 [klein]'s real-image side (codec, layouts, noise levels: the pipelines share them), with the velocity
    of one transformer call a step whose guidance scale is an input, as the pipeline's loop makes it."""

    @staticmethod
    def velocity(pipe, prompt, guidance, max_sequence_length, shape):
        from ..routing import exclusive, execution_device

        net, device = pipe.transformer, execution_device(pipe)
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        with torch.no_grad(), exclusive(pipe):
            embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=device, **kwargs)
        image_ids = pipe._prepare_latent_ids(torch.empty(1, 1, *shape[-2:])).to(device)
        embedded = torch.full([1], float(guidance), device=device, dtype=torch.float32)

        @torch.no_grad()
        def v(x, t):  # x: (1, tokens, channels)
            timestep = (t.to(device).expand(x.shape[0]) / 1000).to(x.dtype)
            return net(hidden_states=x, timestep=timestep, guidance=embedded.expand(x.shape[0]),
                       encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

        return v


def tiny_mistral_tokenizer(folder: Path):
    """The tiny Qwen-style byte-level BPE (`testing.tiny_qwen_tokenizer`: every listed word one token) rewrapped as a
    plain fast tokenizer with Mistral's special tokens and the chat template above, saved to folder / "tokenizer".
    The pipeline's system message is one (ordinary) token of it, so the template around a prompt is five tokens, as
    short as the other tiny chat templates: the tests' short sequence lengths hold a prompt."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from ..testing import tiny_qwen_tokenizer

    backend = tiny_qwen_tokenizer(folder / "_qwen").backend_tokenizer
    backend.add_special_tokens(list(MISTRAL_SPECIAL))
    backend.add_tokens([AddedToken(SYSTEM_MESSAGE, normalized=False, special=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens=list(MISTRAL_SPECIAL[4:]))
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.save_pretrained(str(folder / "tokenizer"))
    return PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))


def tiny(folder: Path):
    """A 31-layer Mistral3 (Mistral text model, a one-layer Pixtral vision tower the pipeline never runs) read at
    layers 10, 20 and 30, a plain fast tokenizer with Mistral's chat template in place of the PixtralProcessor, and
    klein's tiny transformer and autoencoder with the guidance embedding on."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = tiny_mistral_tokenizer(folder)
    width = 16
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, patch_size=4, image_size=32)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, spatial_merge_size=1,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]")))
    return Flux2Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, **tiny_parts(3 * width, guidance_embeds=True))


class Flux2Dev(Flux2):
    tokens = staticmethod(tokens)
    guidance = staticmethod(guidance)
    tiny = staticmethod(tiny)


FLUX2_DEV = Flux2Dev("flux2dev", "Flux.2 [dev]", "joint", pipelines=("Flux2Pipeline",), networks=(), packed=True,
                     flow=True, processors=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"),
                     guidance_calls=False, concepts=Flux2Concepts, latents=Flux2DevLatents,
                     # FlowEdit: the paper published no Flux.2 settings; its FLUX (Flux.1 [dev]) ones
                     # (fallenshock/FlowEdit, FLUX_exp.yaml), the embedded-guidance analogue, carried over untuned
                     flowedit=(28, 24, 1.5, 5.5))
FAMILIES = (FLUX2_DEV,)
