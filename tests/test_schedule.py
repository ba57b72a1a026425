import pytest
import torch

from prompt2prompt.errors import PromptError
from prompt2prompt.schedule import cross_schedule, parse_spans, step_range
from prompt2prompt.tokens import PromptTokens


def test_step_ranges():
    assert step_range(0.8, 50) == (0, 40)
    assert step_range((0.2, 0.6), 50) == (10, 30)
    assert step_range(0.0, 50) == (0, 0)
    assert step_range(1.0, 10) == (0, 10)
    with pytest.raises(PromptError, match="fraction"):
        step_range(1.5, 10)


def test_global_and_per_word_schedule(tokenizer):
    targets = [PromptTokens.from_tokenizer(tokenizer, t) for t in ("a red lion", "a xylophone lion")]
    alpha = cross_schedule({"default": 1.0, "lion": 0.4}, targets, 10)
    assert alpha.shape == (10, 2, 77)
    lion0, lion1 = targets[0].positions("lion"), targets[1].positions("lion")
    expected = torch.ones(10, 77)
    expected[4:, list(lion0)] = 0
    torch.testing.assert_close(alpha[:, 0], expected)
    assert alpha[:4, 1, list(lion1)].eq(1).all() and alpha[4:, 1, list(lion1)].eq(0).all()
    other = [i for i in range(77) if i not in lion1]
    assert alpha[:, 1, other].eq(1).all()


def test_pair_and_fraction_schedules(tokenizer):
    targets = [PromptTokens.from_tokenizer(tokenizer, "a red circle")]
    alpha = cross_schedule(0.5, targets, 4)
    assert alpha[:, 0, 0].tolist() == [1, 1, 0, 0]
    alpha = cross_schedule({"default": (0.25, 0.75), "red": (0.5, 1.0)}, targets, 4)
    assert alpha[:, 0, 0].tolist() == [0, 1, 1, 0]
    assert alpha[:, 0, 2].tolist() == [0, 0, 1, 1]


def test_unknown_schedule_word(tokenizer):
    targets = [PromptTokens.from_tokenizer(tokenizer, "a red circle")]
    with pytest.raises(PromptError, match="'lion'"):
        cross_schedule({"lion": 0.2}, targets, 4)


def test_parse_spans():
    assert parse_spans("0.8") == 0.8
    assert parse_spans("0.2,0.8") == (0.2, 0.8)
    assert parse_spans("default=1.0,lion=0.4") == {"default": 1.0, "lion": 0.4}
    assert parse_spans("lion=0.1:0.4") == {"lion": (0.1, 0.4)}
    with pytest.raises(PromptError, match="expected a step span"):
        parse_spans("lots")
