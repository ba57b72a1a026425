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
    part: str = ""  # which encoder's part of a joint text sequence ("clip", "t5"); "" for a single encoder


@dataclass(frozen=True)
class PromptTokens:
    """One prompt's tokenisation: enough to find a word's tokens without the tokenizer (maps saved to disk keep it)."""

    prompt: str
    tokens: tuple[str, ...]  # readable token strings of the real tokens, start and end token included
    words: tuple[Word, ...]
    length: int  # the padded length the text encoder sees (tokenizer.model_max_length)
    ids: tuple[int, ...] = ()  # the token ids of the real tokens (start and end included)
    truncated: str = ""  # the end of the prompt that did not fit in `length` tokens (the model never sees it)
    parts: tuple[tuple[str, int, PromptTokens], ...] = ()  # a joint sequence: (name, offset, that encoder's tokens)
    head: int = 1  # positions before the prompt's own tokens: the start token, or a chat template's opening
    tail: int | None = None  # position of the first token after the prompt's own (None: the last token, its end)

    @classmethod
    def from_tokenizer(cls, tokenizer, prompt: str, length: int | None = None) -> PromptTokens:
        """One encoder's view: length is the padded sequence length (default: the tokenizer's model_max_length)."""
        if not getattr(tokenizer, "is_fast", True):
            raise PromptError(f"{type(tokenizer).__name__} is a slow tokenizer, which cannot give the character "
                              "offsets that find words; load the pipeline with a fast tokenizer (transformers >= 5 "
                              "does)")
        length = int(length or tokenizer.model_max_length)
        enc = tokenizer(prompt, truncation=True, max_length=length, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        covered = max((e for s, e in offsets if e > s), default=0)
        rest = prompt[covered:].strip()
        truncated = rest if len(ids) >= length and rest else ""
        pieces = tokenizer.convert_ids_to_tokens(ids)
        readable = tuple(_readable(tokenizer, p, i) for i, p in zip(ids, pieces))
        words = []
        for m in _WORD.finditer(prompt):
            positions = tuple(
                pos for pos, (s, e) in enumerate(offsets) if e > s and s < m.end() and e > m.start()
            )
            if positions:  # a word cut off by truncation has no tokens
                words.append(Word(m.group(), m.start(), m.end(), positions))
        return cls(prompt, readable, tuple(words), length, tuple(int(i) for i in ids), truncated)

    @classmethod
    def from_template(cls, tokenizer, prompt: str, render, length: int, skip: int = 0, padded: bool = True,
                      max_tokens: int | None = None, multiple: int = 1) -> PromptTokens:
        """A prompt inside a template (a chat template): `render(text)` is what the tokenizer reads around a prompt.
        The denoiser sees the templated tokens from position `skip` on (a pipeline that drops the template's
        opening), at most `length` of them, padded to `length` (or, not `padded`, as many as there are, rounded up
        to a `multiple`: a denoiser that pads the text itself); the tokenizer reads at most max_tokens (default
        skip + length). The prompt's words are found by their character offsets in the rendered text; the
        template's tokens before and after the prompt are its `head` and `tail`, kept in place by the edits'
        alignment; its maps are those of the prompt's tokens and the token closing them."""
        marker = "\x00"
        opening = render(marker).split(marker)[0]
        text = render(prompt)
        if not text.startswith(opening) or not text[len(opening):].startswith(prompt):
            raise PromptError(f"the model's prompt template does not hold the prompt {_short(prompt)} verbatim")
        start, stop = len(opening), len(opening) + len(prompt)
        limit = max_tokens or skip + length
        enc = tokenizer(text, truncation=True, max_length=limit, return_offsets_mapping=True)
        cut = len(enc["input_ids"]) >= limit or len(enc["input_ids"]) > skip + length
        ids = list(enc["input_ids"])[skip : skip + length]
        offsets = [tuple(o) for o in enc["offset_mapping"]][skip : skip + length]
        head = sum(1 for s, e in offsets if e <= start)
        after = [i for i, (s, e) in enumerate(offsets) if s >= stop and i >= head]
        tail = after[0] if after else len(ids)
        covered = max((min(e, stop) - start for s, e in offsets[head:tail] if e > s), default=0)
        truncated = prompt[covered:].strip() if cut else ""
        pieces = tokenizer.convert_ids_to_tokens(ids)
        readable = tuple(_readable(tokenizer, p, i) for i, p in zip(ids, pieces))
        words = []
        for m in _WORD.finditer(prompt):
            positions = tuple(pos for pos in range(head, tail) if offsets[pos][1] > offsets[pos][0]
                              and offsets[pos][0] < m.end() + start and offsets[pos][1] > m.start() + start)
            if positions:  # a word cut off by truncation has no tokens
                words.append(Word(m.group(), m.start(), m.end(), positions))
        size = int(length) if padded else -(-len(ids) // multiple) * multiple
        return cls(prompt, readable, tuple(words), size, tuple(int(i) for i in ids), truncated, (), head, tail)

    @classmethod
    def joint(cls, prompt: str, parts: list[tuple[str, PromptTokens]]) -> PromptTokens:
        """The text sequence of an MM-DiT whose encoders' outputs are concatenated along the sequence (SD3: CLIP then
        T5): every part keeps its positions, shifted by the parts before it; a word appears once per part."""
        offset, words, labels, placed = 0, [], [], []
        for name, p in parts:
            words += [Word(w.text, w.start, w.end, tuple(t + offset for t in w.tokens), name) for w in p.words]
            labels += list(p.tokens) + ["<pad>"] * (p.length - len(p.tokens))
            placed.append((name, offset, p))
            offset += p.length
        # cut only if no part saw all of it (SD3's T5 part sees far more than its CLIP part)
        cuts = [p.truncated for _, p in parts if p.tokens]
        truncated = min(cuts, key=len) if cuts and all(cuts) else ""
        return cls(prompt, tuple(labels), tuple(words), offset, (), truncated, tuple(placed))

    # --- lookup -----------------------------------------------------------------------------------------------
    @property
    def end(self) -> int:
        """Position of the end token (a template's first token after the prompt); positions after it are the rest
        of the template and padding (a single encoder's sequence)."""
        if self.parts:
            raise PromptError("a joint text sequence has one end token per part: use real_positions()")
        return len(self.tokens) - 1 if self.tail is None else self.tail

    def real_positions(self, start: bool = False) -> list[int]:
        """Positions of the prompt's own tokens (words and the end token; a start token if asked), not padding."""
        if self.parts:
            return [offset + i for _, offset, p in self.parts for i in p.real_positions(start)]
        if self.tail is not None:  # a template around the prompt: its words and the token closing them (its opening
            # as the start)
            return list(range(0 if start else self.head, min(self.tail + 1, len(self.tokens))))
        return [i for i, t in enumerate(self.tokens) if start or t != "<start>"]

    def word_positions(self) -> list[int]:
        """Positions of the tokens that belong to the prompt's words (no start, end or padding token)."""
        return sorted({t for w in self.words for t in w.tokens})

    def part_of(self, name: str | None) -> tuple[int, PromptTokens]:
        """(offset, tokens) of one part of a joint sequence (the whole sequence when name is None or single)."""
        if name is None or not self.parts:
            return 0, self
        for part, offset, p in self.parts:
            if part == name:
                return offset, p
        raise PromptError(f"this model's text has no part {name!r}: it has {', '.join(n for n, _, _ in self.parts)}")

    def word_list(self) -> list[str]:
        return [w.text for w in self.words]

    def limit(self) -> str:
        """The model's text limit in words: "77 tokens", or per part of a joint sequence ("77 clip and 256 t5
        tokens")."""
        if self.parts:
            return " and ".join(f"{p.length} {name}" for name, _, p in self.parts) + " tokens"
        return f"{self.length} tokens"

    def cut_off(self, query: str) -> bool:
        """Whether a word is in the part of the prompt the model never sees (cut off by the token limit)."""
        wanted = [m.group().lower() for m in _WORD.finditer(query)]
        cut = [m.group().lower() for m in _WORD.finditer(self.truncated)]
        return bool(wanted) and any(cut[i : i + len(wanted)] == wanted for i in range(len(cut) - len(wanted) + 1))

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
            real = self.real_positions(start=True)
            raise PromptError(f"token index {index!r} is outside 0..{self.length - 1} (the prompt {self.prompt!r} "
                              f"has {len(real)} real tokens; the rest is padding)")

    def positions(self, query: str | int, occurrence: int | None = None, part: str | None = None) -> tuple[int, ...]:
        """Token positions of a word (all occurrences unless one is chosen; in one part of a joint sequence if named),
        or of a token given by its index."""
        if isinstance(query, int):
            self.check_index(query)
            return (query,)
        if part is not None and self.parts:
            offset, p = self.part_of(part)
            return tuple(t + offset for t in p.positions(query, occurrence))
        found = self.find(query)
        if not found:
            if self.cut_off(query):
                raise PromptError(f"{query!r} is in the part of the prompt the model never sees: the prompt is longer "
                                  f"than its {self.limit()} and is cut before {self.truncated[:40]!r}")
            raise PromptError(
                f"{query!r} is not a word of the prompt {_short(self.prompt)}; its words are: "
                f"{_short(', '.join(self.word_list()), 200, quote=False)}"
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
            "words": [[w.text, w.start, w.end, list(w.tokens), w.part] for w in self.words],
            "length": self.length,
            "ids": list(self.ids),
            "truncated": self.truncated,
            "parts": [[name, offset, p.to_dict()] for name, offset, p in self.parts],
            "head": self.head,
            "tail": self.tail,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PromptTokens:
        words = tuple(Word(w[0], w[1], w[2], tuple(w[3]), w[4] if len(w) > 4 else "") for w in d["words"])
        parts = tuple((name, int(offset), cls.from_dict(p)) for name, offset, p in d.get("parts", ()))
        return cls(d["prompt"], tuple(d["tokens"]), words, int(d["length"]), tuple(d.get("ids", ())),
                   d.get("truncated", ""), parts, int(d.get("head", 1)), d.get("tail"))


def _short(text: str, limit: int = 80, quote: bool = True) -> str:
    """A prompt (or a list of words) for a message, quoted, cut to about limit characters."""
    shown = (repr if quote else str)(text[:limit])
    return shown if len(text) <= limit else shown + f" (and {len(text) - limit} more characters)"


def _readable(tokenizer, piece: str, token_id: int) -> str:
    if token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        return "<start>" if token_id == tokenizer.bos_token_id else "<end>"
    return tokenizer.decode([token_id]).strip() or piece


def sequence_length(pipe, max_sequence_length: int | None = None) -> int | None:
    """The T5 sequence length an MM-DiT pipeline pads to: the given one, else the pipeline's own default."""
    import inspect

    if max_sequence_length:
        return int(max_sequence_length)
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    return int(param.default) if param is not None else None


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens written as markup (`<|endoftext|>`, `</s>`, a chat template's `<|im_end|>`): as
    text in a prompt, each becomes that control token, not words. Special tokens that are ordinary text (SD 2.x pads
    with "!") read as text and are left alone."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(t for t in specials if len(t) > 2 and t.startswith("<") and t.endswith(">"))


def check_control_tokens(pipe, prompt: str) -> None:
    """A prompt holding a tokenizer's special token is refused: it would not be read as text (Qwen's `<|im_end|>`
    would close its chat template's turn; CLIP's `<|endoftext|>` would end the prompt), as stock diffusers would do
    silently. There is no way to write them as text through these tokenizers, so they are refused, not escaped."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None or not hasattr(tokenizer, "all_special_tokens"):
            continue
        found = [t for t in control_tokens(tokenizer) if t in prompt]
        if found:
            raise PromptError(f"the prompt holds {', '.join(map(repr, found))}, the model's control token(s) (its "
                              f"{name}'s special tokens), which would not be read as text: remove them")


def prompt_tokens(pipe, prompt: str, max_sequence_length: int | None = None) -> PromptTokens:
    """A prompt as the pipeline's denoiser sees its text, by its family's adapter: one CLIP sequence (SD 1.x/2.x/XL:
    their encoders share positions), CLIP then T5 (SD3), T5 alone (Flux.1), a chat template around the prompt
    (Flux.2), ... A prompt holding one of the model's control tokens is refused (`check_control_tokens`).

    Read under the pipeline's lock (`routing.exclusive`): a fast tokenizer must not be called from two threads at
    once ("Already borrowed"), and a generation running in another thread calls this pipeline's tokenizers."""
    from .families import family_of
    from .routing import exclusive

    with exclusive(pipe):
        check_control_tokens(pipe, prompt)
        return family_of(pipe).tokens(pipe, prompt, max_sequence_length)


def batch_tokens(pipe, prompts: list[str], max_sequence_length: int | None = None) -> list[PromptTokens]:
    """The prompts of one generation as its denoiser sees them; where the pipeline pads a call's texts to the longest
    of them (its family's `batch_padded`), every prompt's sequence has that length."""
    from dataclasses import replace

    from .families import family_of

    tokens = [prompt_tokens(pipe, p, max_sequence_length) for p in prompts]
    if family_of(pipe).batch_padded and tokens:
        length = max(t.length for t in tokens)
        tokens = [replace(t, length=length) for t in tokens]
    return tokens
