"""Prompts as the model sees them: tokens, the words they come from, and looking words up.

Word boundaries follow CLIP's own pre-tokenisation pattern (letters, single digits, runs of punctuation), and every
token is assigned to the word its character offsets fall in, so multi-token words, repeated words, punctuation and
capitals are handled by the pipeline's real tokenizer rather than by guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PromptError

# CLIP's pre-tokenisation (openai/CLIP simple_tokenizer.py) without its special-token and contraction branches:
# words of letters, single digits, runs of other non-space characters.
_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


@dataclass(frozen=True)
class Word:
    text: str  # as written in the prompt
    start: int  # character span in the prompt
    end: int
    tokens: tuple[int, ...]  # token positions in the padded sequence (0 is the start token)


@dataclass(frozen=True)
class PromptTokens:
    """One prompt's tokenisation: enough to find a word's tokens without the tokenizer (maps saved to disk keep it)."""

    prompt: str
    tokens: tuple[str, ...]  # readable token strings of the real tokens, start and end token included
    words: tuple[Word, ...]
    length: int  # the padded length the text encoder sees (tokenizer.model_max_length)
    ids: tuple[int, ...] = ()  # the token ids of the real tokens (start and end included)
    truncated: str = ""  # the end of the prompt that did not fit in `length` tokens (the model never sees it)

    @classmethod
    def from_tokenizer(cls, tokenizer, prompt: str) -> PromptTokens:
        if not getattr(tokenizer, "is_fast", True):
            raise PromptError(f"{type(tokenizer).__name__} is a slow tokenizer, which cannot give the character "
                              "offsets that find words; load the pipeline with a fast tokenizer (transformers >= 5 "
                              "does)")
        enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        covered = max((e for s, e in offsets if e > s), default=0)
        rest = prompt[covered:].strip()
        truncated = rest if len(ids) >= tokenizer.model_max_length and rest else ""
        pieces = tokenizer.convert_ids_to_tokens(ids)
        readable = tuple(_readable(tokenizer, p, i) for i, p in zip(ids, pieces))
        words = []
        for m in _WORD.finditer(prompt):
            positions = tuple(
                pos for pos, (s, e) in enumerate(offsets) if e > s and s < m.end() and e > m.start()
            )
            if positions:  # a word cut off by truncation has no tokens
                words.append(Word(m.group(), m.start(), m.end(), positions))
        return cls(prompt, readable, tuple(words), int(tokenizer.model_max_length), tuple(int(i) for i in ids),
                   truncated)

    # --- lookup -----------------------------------------------------------------------------------------------
    @property
    def end(self) -> int:
        """Position of the end token; positions after it are padding."""
        return len(self.tokens) - 1

    def word_list(self) -> list[str]:
        return [w.text for w in self.words]

    def find(self, query: str) -> list[tuple[int, ...]]:
        """Token positions of every occurrence of query (one or more words, any case), in prompt order."""
        wanted = [m.group().lower() for m in _WORD.finditer(query)]
        if not wanted:
            raise PromptError(f"expected a word to look up, got {query!r}")
        found = []
        texts = [w.text.lower() for w in self.words]
        for i in range(len(texts) - len(wanted) + 1):
            if texts[i : i + len(wanted)] == wanted:
                found.append(tuple(t for w in self.words[i : i + len(wanted)] for t in w.tokens))
        return found

    def label(self, index: int) -> str:
        """The readable token at a position (checked), "<pad>" after the end token."""
        self.check_index(index)
        return self.tokens[index] if index < len(self.tokens) else "<pad>"

    def check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.length:
            raise PromptError(f"token index {index!r} is outside 0..{self.length - 1} (the prompt {self.prompt!r} "
                              f"has {len(self.tokens)} real tokens, positions 0..{self.end}; the rest is padding)")

    def positions(self, query: str | int, occurrence: int | None = None) -> tuple[int, ...]:
        """Token positions of a word (all occurrences unless one is chosen), or of a token given by its index."""
        if isinstance(query, int):
            self.check_index(query)
            return (query,)
        found = self.find(query)
        if not found:
            raise PromptError(
                f"{query!r} is not a word of the prompt {self.prompt!r}; its words are: {', '.join(self.word_list())}"
            )
        if occurrence is None:
            return tuple(t for f in found for t in f)
        if not 0 <= occurrence < len(found):
            raise PromptError(
                f"{query!r} occurs {len(found)} time(s) in {self.prompt!r}; occurrence {occurrence} was asked"
            )
        return found[occurrence]

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "tokens": list(self.tokens),
            "words": [[w.text, w.start, w.end, list(w.tokens)] for w in self.words],
            "length": self.length,
            "ids": list(self.ids),
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PromptTokens:
        words = tuple(Word(t, s, e, tuple(p)) for t, s, e, p in d["words"])
        return cls(d["prompt"], tuple(d["tokens"]), words, int(d["length"]), tuple(d.get("ids", ())),
                   d.get("truncated", ""))


def _readable(tokenizer, piece: str, token_id: int) -> str:
    if token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        return "<start>" if token_id == tokenizer.bos_token_id else "<end>"
    return tokenizer.decode([token_id]).strip() or piece
