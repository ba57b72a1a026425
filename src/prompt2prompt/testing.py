"""Tiny random pipelines, built offline in code (as diffusers' own tests do), one per family that has a builder:
SD 1.x, 2.x, XL, 3, Flux.1, Flux.2 [klein] and [dev], Qwen-Image and Z-Image.

Each family's adapter builds its own (`Family.tiny`, in `families/`): the real architecture at toy widths. This module
holds what they share: the CLIP tokenizer and text config, a small autoencoder, a T5-style tokenizer (a small
SentencePiece-style unigram model made with the `tokenizers` library and wrapped in transformers' fast T5 class) and a
Qwen-style tokenizer (a byte-level BPE whose merges make every listed word one token, with a chat template in Qwen's
format). Used by the tests and the benchmarks; weights are random, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer

from .families import FAMILIES
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


def tiny_t5(tokenizer, width: int):
    """A 2-layer T5 encoder of this width for the tokenizer."""
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


def clip_config(tokenizer, width: int, projection: int | None = None) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder's config of this width for the tokenizer."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or width, bos_token_id=0,
        eos_token_id=1, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(shift_factor: float | None = None) -> AutoencoderKL:
    """A 2-level autoencoder with 4 latent channels (factor 2 here: 32x32 images, 16x16 latents)."""
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        shift_factor=shift_factor,
    )


# what tiny_pipeline builds: the families with a tiny builder whose pipeline the installed diffusers has
KINDS = tuple(name for name, family in FAMILIES.items() if family.has_tiny and family.installed)


def tiny_pipeline(kind: str, folder: str | Path, seed: int = 0):
    """A tiny random pipeline of the family named `kind` (one of KINDS), by its adapter's `tiny`; folder receives
    the tokenizer files. Images are 32x32 (UNet latents 16x16; MM-DiTs 8x8 image tokens). Every component is in eval
    mode (as from_pretrained leaves them: T5's dropout would otherwise make runs differ)."""
    if kind not in KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}: expected one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    pipe = FAMILIES[kind].tiny(Path(folder))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


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
