"""A CLIP-style BPE tokenizer for the shapes world, trained with the `tokenizers` library.

It uses CLIP's normaliser and split pattern, a byte-level alphabet and the `</w>` end-of-word suffix, and is written out
as `vocab.json` + `merges.txt`, so `CLIPTokenizer.from_pretrained(folder)` loads it exactly like SD's tokenizer. Every
caption word is one token; any other text still tokenises (into several byte-level pieces).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py), also used by transformers' CLIPTokenizer.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MODEL_MAX_LENGTH = 77  # SD's text length, so prompts pad exactly as in Stable Diffusion

# Everyday words learnt as merges too, so that prompts outside the world split into a few readable pieces.
_EXTRA_WORDS = (
    "the of on in with an photo painting watercolor of cat dog squirrel lion burger eating big small tiny huge "
    "bright dark pink white black brown gray grey star heart hexagon oval ring on top left right next to"
).split()


def train_tokenizer(folder: str | Path, vocab_size: int = 640) -> Path:
    """Train the BPE on the world's words and write vocab.json, merges.txt and the configs into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    # World words weigh most, so each of them becomes a single token.
    corpus = [" ".join(vocabulary())] * 50 + [" ".join(_EXTRA_WORDS)] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    # Like CLIP's vocabulary, hold every byte both inside a word and at a word's end (",</w>"), so that no text
    # falls back to the unknown token.
    for char in pre_tokenizers.ByteLevel.alphabet():
        for piece in (char, char + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2)
    )
    return folder
