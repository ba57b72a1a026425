import pytest
import torch

from prompt2prompt.alignment import align_sequences, refine_alignment, replace_mapper
from prompt2prompt.errors import PromptError
from prompt2prompt.tokens import PromptTokens


def pt(tokenizer, text):
    return PromptTokens.from_tokenizer(tokenizer, text)


def test_refine_alignment_of_the_paper_example(tokenizer):
    src = pt(tokenizer, "a squirrel eating a burger")
    tgt = pt(tokenizer, "a watercolor painting of a squirrel eating a burger")
    assert tgt.tokens[1:10] == ("a", "watercolor", "painting", "of", "a", "squirrel", "eating", "a", "burger")
    al = refine_alignment(src, tgt)
    # start; "a squirrel eating a burger" (source 1..5) is target 5..9; "a watercolor painting of" (1..4) is new;
    # the end token and padding follow in order
    assert al.index[:12].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert al.weight[:12].tolist() == [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert al.index[76] == 76 - 4 and al.weight[10:].eq(1).all()


def test_refine_with_a_multi_token_new_word(tokenizer):
    src = pt(tokenizer, "a circle")
    tgt = pt(tokenizer, "a xylophone circle")
    n = len(tgt.positions("xylophone"))
    al = refine_alignment(src, tgt)
    assert al.pairs()[:3] == [(0, 0), (1, 1), (2, 2 + n)]
    assert al.weight[2 : 2 + n].eq(0).all()


def test_align_sequences_prefers_the_adjacent_article():
    assert align_sequences(list("ab"), list("xab")) == [(0, 1), (1, 2)]
    assert align_sequences(["a", "dog"], ["a", "big", "a", "dog"]) == [(0, 2), (1, 3)]
    assert align_sequences([], ["a"]) == []


def test_replace_mapper_same_token_counts(tokenizer):
    src = pt(tokenizer, "a red circle and a blue square")
    tgt = pt(tokenizer, "a red circle and a blue triangle")
    m = replace_mapper(src, tgt)
    torch.testing.assert_close(m, torch.eye(77))


def test_replace_mapper_shares_weight_among_new_tokens(tokenizer):
    src = pt(tokenizer, "a squirrel eating a burger")
    tgt = pt(tokenizer, "a xylophone eating a burger")
    xs = tgt.positions("xylophone")
    n = len(xs)
    assert n > 1
    m = replace_mapper(src, tgt)
    assert m[2, list(xs)].tolist() == pytest.approx([1 / n] * n)
    assert m[2].sum() == pytest.approx(1.0)
    # words after the swap shift by n - 1 positions
    assert m[3, 2 + n] == 1 and m[4, 3 + n] == 1 and m[5, 4 + n] == 1
    assert m[6, 5 + n] == 1  # end token
    assert (m.sum(0) > 0).all()  # every target position gets something
    source_attention = torch.rand(4, 77)
    mapped = source_attention @ m
    torch.testing.assert_close(mapped[:, list(xs)].sum(1), source_attention[:, 2])


def test_replace_needs_equal_word_counts(tokenizer):
    with pytest.raises(PromptError, match="use refine"):
        replace_mapper(pt(tokenizer, "a circle"), pt(tokenizer, "a red circle"))
