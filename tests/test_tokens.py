import pytest

from prompt2prompt.errors import PromptError
from prompt2prompt.tokens import PromptTokens


def test_tokens_of_a_plain_prompt(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "a red circle and a blue square")
    assert p.tokens == ("<start>", "a", "red", "circle", "and", "a", "blue", "square", "<end>")
    assert p.end == 8
    assert p.positions("circle") == (3,)
    assert p.positions("square") == (7,)
    assert p.length == 77


def test_multi_token_word_gets_all_its_tokens(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "a xylophone on a circle")
    xylo = p.positions("xylophone")
    assert len(xylo) > 1
    assert xylo == tuple(range(2, 2 + len(xylo)))  # consecutive, right after "a"
    assert "".join(p.tokens[i] for i in xylo) == "xylophone"
    assert p.positions("on") == (2 + len(xylo),)


def test_repeated_words_capitals_and_punctuation(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "A Circle, a circle!! and a CIRCLE")
    # tokens: <start> a circle , a circle ! ! and a circle <end>
    assert p.positions("circle") == (2, 5, 10)
    assert p.positions("CIRCLE", occurrence=1) == (5,)
    assert p.positions(",") == (3,)
    assert p.positions("!!") == (6, 7)
    assert p.positions("a circle") == (1, 2, 4, 5, 9, 10)
    assert p.positions("a circle", occurrence=2) == (9, 10)


def test_unknown_word_lists_the_prompt_words(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "a red circle")
    with pytest.raises(PromptError) as err:
        p.positions("lion")
    message = str(err.value)
    assert "'lion'" in message and "a, red, circle" in message


def test_bad_occurrence_and_index(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "a red circle")
    with pytest.raises(PromptError, match="occurs 1 time"):
        p.positions("red", occurrence=1)
    with pytest.raises(PromptError, match="outside"):
        p.positions(80)
    assert p.positions(5) == (5,)


def test_round_trip_through_dict(tokenizer):
    p = PromptTokens.from_tokenizer(tokenizer, "a xylophone, a circle")
    assert PromptTokens.from_dict(p.to_dict()) == p
