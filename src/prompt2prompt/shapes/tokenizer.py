"""A CLIP-style BPE tokenizer for the shapes world, learnt deterministically from the world's words.

It has CLIP's byte-level alphabet and `</w>` end-of-word suffix (CLIPTokenizer applies CLIP's normaliser and split
pattern when it loads the files), and is written out
as `vocab.json` + `merges.txt`, so `CLIPTokenizer.from_pretrained(folder)` loads it exactly like SD's tokenizer. Every
caption word is one token; any other text still tokenises (into several byte-level pieces).
"""

from __future__ import annotations

import json
from pathlib import Path

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # SD's text length, so prompts pad exactly as in Stable Diffusion

# Everyday words learnt as merges too, so that prompts outside the world split into a few readable pieces.
_EXTRA_WORDS = (
    "the of on in with an photo painting watercolor of cat dog squirrel lion burger eating big small tiny huge "
    "bright dark pink white black brown gray grey star heart hexagon oval ring on top left right next to"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def learn_merges(words: dict[str, int], max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from word counts; ties go to the lexicographically smallest pair, so it is exact to
    the byte across runs (the `tokenizers` trainer is not: its ids change from run to run)."""
    byte_map = bytes_to_unicode()
    splits = {}
    for word, count in words.items():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        splits[tuple(chars)] = splits.get(tuple(chars), 0) + count
    merges = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, count in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new = {}
        for symbols, count in splits.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + count
        splits = new
    return merges


def train_tokenizer(folder: str | Path, max_merges: int = 400) -> Path:
    """Learn the BPE on the world's words and write vocab.json, merges.txt and the configs into folder.

    The vocabulary is laid out like CLIP's (bytes, bytes + "</w>", merges), with the start and end tokens first so
    their ids are 0 and 1. The same inputs give the same files, byte for byte.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {w: 50 for w in vocabulary()}  # world words weigh most: each becomes a single token
    for w in _EXTRA_WORDS:
        counts[w] = counts.get(w, 0) + 5
    merges = learn_merges(counts, max_merges)
    alphabet = list(bytes_to_unicode().values())
    tokens = [BOS, EOS, *alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
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
