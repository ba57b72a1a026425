"""Tiny random pipelines, built offline in code (as diffusers' own tests do): SD 1.x, 2.x, XL, 3, Flux.1, Flux.2
[klein], Qwen-Image and Z-Image.

They have the real architectures at toy widths: SD 1.x (epsilon, 32-wide text), SD 2.x (v-prediction, linear
projections, a wider text encoder, "!" padding), SDXL (two text encoders, added time/text conditioning), SD3 (an
MM-DiT with two CLIP encoders and a T5 encoder, image tokens then text in each joint attention, a context-only last
block, qk-norm and a dual-attention block as SD3.5), Flux (an MM-DiT with a CLIP and a T5 encoder, text then image in
its double-stream blocks, single-stream blocks, rotary embeddings, packed latents), Flux.2 [klein] (a 28-layer Qwen3
read at layers 9, 18 and 27, parallel single-stream attention, patchified latents), Qwen-Image (a Qwen2.5-VL text
encoder, its 34-token template opening dropped, complex rotary embeddings) and Z-Image (a Qwen3 base, refiners and
image-first main layers). The T5 tokenizer is a small SentencePiece-style unigram model made with the `tokenizers`
library and wrapped in transformers' fast T5 class; the Qwen tokenizer a byte-level BPE whose merges make every listed
word one token, with a chat template in Qwen's format. Used by the tests and the benchmarks; weights are random, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .shapes.model import SD_SCHEDULE
from .shapes.tokenizer import train_tokenizer

T5_WORDS = ("the of on in with photo painting watercolor cat dog squirrel lion burger eating big small red orange "
            "yellow green blue purple circle square triangle cross a an and").split()


def tiny_t5_tokenizer(folder: str | Path, max_length: int = 32):
    """A T5-style tokenizer (SentencePiece unigram pieces with the "▁" word marker, </s> appended, <pad> = 0), saved
    to folder: every word of T5_WORDS is one piece, anything else falls back to single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set("".join(T5_WORDS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in dict.fromkeys(T5_WORDS)]
    vocab += [("▁", -2.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                         model_max_length=max_length)
    t5.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


# Qwen3's chat format for one user turn with thinking off (the layout of Qwen3's published template; written here, not
# copied): what Flux.2 klein's text encoder reads around a prompt
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


# the words of Qwen-Image's prompt template (its system line), one token each as in Qwen's own vocabulary
QWEN_IMAGE_WORDS = ("system Describe image by detailing color shape size texture quantity text spatial relationships "
                    "of objects background").split()


def tiny_qwen_tokenizer(folder: str | Path, extra_words: tuple[str, ...] = ()):
    """A Qwen2-style byte-level BPE tokenizer with the chat template above, saved to folder: every word of T5_WORDS
    (and "user", "assistant", extra_words) is one token with or without its leading space, anything else falls back
    to bytes."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges: dict[tuple[str, str], int] = {}  # pair -> rank

    def pieces(word: str) -> list[str]:
        """The word as BPE with the merges so far splits it (the lowest-ranked adjacent pair first)."""
        parts = list(word)
        while len(parts) > 1:
            ranked = [(merges.get(pair, len(merges)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == len(merges):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def add(word: str) -> None:
        """Merges (ranked after every earlier one, so no earlier word changes) that join the word into one token."""
        parts = pieces(word)
        while len(parts) > 1:
            merges.setdefault((parts[0], parts[1]), len(merges))
            parts[:2] = [parts[0] + parts[1]]
            vocab.setdefault(parts[0], len(vocab))

    words = tuple(dict.fromkeys((*T5_WORDS, "user", "assistant", *extra_words)))
    for w in words:  # the spaced forms' merges rank first, so " red" is one token rather than " " + "red"
        add("Ġ" + w)
    for w in words:
        add(w)
    add("ĊĊ")
    special = {t: len(vocab) + i for i, t in enumerate(QWEN_SPECIAL)}
    tok = Qwen2Tokenizer(vocab={**vocab, **special}, merges=list(merges), unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=list(QWEN_SPECIAL[1:]))
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return Qwen2Tokenizer.from_pretrained(str(folder))


def tiny_tokenizer(folder: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
    train_tokenizer(folder)
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **extra)


def _text_config(tokenizer, width: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or width, bos_token_id=0,
        eos_token_id=1, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(shift_factor: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        shift_factor=shift_factor,
    )


def tiny_pipeline(kind: str, folder: str | Path, seed: int = 0):
    """kind: 'sd1', 'sd2', 'sdxl', 'sd3' or 'flux'. folder receives the tokenizer files. Images are 32x32: UNet
    latents 16x16; SD3 16x16 latents in 8x8 tokens (patch 2); Flux 16x16 latents packed into 8x8 tokens. Every
    component is in eval mode (as from_pretrained leaves them: T5's dropout would otherwise make runs differ)."""
    pipe = _build(kind, folder, seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _build(kind: str, folder: str | Path, seed: int):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    if kind in ("sd1", "sd2"):
        sd2 = kind == "sd2"
        tokenizer = tiny_tokenizer(folder / "tokenizer", pad_token="!" if sd2 else None)
        width = 64 if sd2 else 32
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=(2, 4), use_linear_projection=sd2, norm_num_groups=32,
        )
        scheduler = DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": "v_prediction" if sd2 else "epsilon"},
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, width)), tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
            requires_safety_checker=False,
        )
    if kind == "sdxl":
        tokenizer = tiny_tokenizer(folder / "tokenizer")
        tokenizer_2 = tiny_tokenizer(folder / "tokenizer_2", pad_token="!")
        time_dim, proj = 8, 32
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=time_dim * 6 + proj, cross_attention_dim=64, norm_num_groups=32,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer, 32)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, 32, proj)),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
            scheduler=DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        )
    if kind == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        tokenizer, tokenizer_2 = tiny_tokenizer(folder / "tokenizer"), tiny_tokenizer(folder / "tokenizer_2")
        tokenizer_3 = tiny_t5_tokenizer(folder / "tokenizer_3")
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(0.05),
            text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, 32)), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, 32)), tokenizer_2=tokenizer_2,
            text_encoder_3=_t5(tokenizer_3, 64), tokenizer_3=tokenizer_3,
        )
    if kind == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        tokenizer, tokenizer_2 = tiny_tokenizer(folder / "tokenizer"), tiny_t5_tokenizer(folder / "tokenizer_2")
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        )
        return FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(0.05),
            text_encoder=CLIPTextModel(_text_config(tokenizer, 32)), tokenizer=tokenizer,
            text_encoder_2=_t5(tokenizer_2, 32), tokenizer_2=tokenizer_2,
        )
    if kind == "flux2":
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        tokenizer = tiny_qwen_tokenizer(folder / "tokenizer")
        width = 16  # Flux.2 klein stacks the encoder's hidden states after layers 9, 18 and 27: 28 tiny layers
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id))
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * width, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                 sample_size=32, layers_per_block=1)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer)
    if kind == "qwenimage":
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer = tiny_qwen_tokenizer(folder / "tokenizer", QWEN_IMAGE_WORDS)
        width = 32
        text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                      fullatt_block_indexes=[0])
        text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer),
                                  image_token_id=0, video_token_id=0, vision_start_token_id=0, vision_end_token_id=0)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=width, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9)
        return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                                 tokenizer=tokenizer, transformer=transformer)
    if kind == "zimage":
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        tokenizer = tiny_qwen_tokenizer(folder / "tokenizer")
        width = 16
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id))
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=width, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(0.05),
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    raise ValueError(f"unknown pipeline kind {kind!r}: expected one of {', '.join(KINDS)}")


KINDS = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "qwenimage", "zimage")  # what tiny_pipeline builds


def main(argv: list[str] | None = None) -> None:
    """python -m prompt2prompt.testing KIND FOLDER: save a tiny random pipeline of KIND (see KINDS) to FOLDER."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Save a tiny random pipeline of one of the supported families (for "
                                     "trying the tool and for tests; its pictures are noise).")
    parser.add_argument("kind", choices=KINDS, help="architecture family")
    parser.add_argument("folder", help="where to save the pipeline")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_pipeline(args.kind, tmp).save_pretrained(args.folder)
    print(f"saved a tiny random {args.kind} pipeline to {args.folder}")


if __name__ == "__main__":
    main()
