import math

import pytest

from services.captioner.bleu import corpus_bleu


def test_identical_segments_score_one() -> None:
    tokens = ["a", "red", "circle", "on", "a", "blue", "background"]
    assert corpus_bleu([tokens], [[tokens]]) == pytest.approx(1.0)


def test_hand_computed_example_with_smoothing() -> None:
    hypothesis = ["the", "cat", "sat", "on", "the", "mat"]
    reference = ["the", "cat", "is", "on", "the", "mat"]
    # clipped precisions 5/6, 3/5, 1/4 and 0/3 → ε/3; equal lengths, no brevity penalty
    expected = math.exp(
        (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)) / 4
    )
    assert corpus_bleu([hypothesis], [[reference]]) == pytest.approx(expected)


def test_clipping_brevity_penalty_and_multiple_references() -> None:
    # "the the the the" matches "the" at most twice (the most in any one reference)
    hypothesis = ["the"] * 4
    references = [["the", "cat", "the", "mat"], ["the", "dog"]]
    score = corpus_bleu([hypothesis], [references], max_order=1)
    assert score == pytest.approx(2 / 4)
    # a hypothesis shorter than the closest reference is penalised
    short = corpus_bleu([["the", "cat"]], [[["the", "cat", "sat", "down"]]], max_order=1)
    assert short == pytest.approx(math.exp(1 - 4 / 2))


def test_empty_hypotheses_score_zero() -> None:
    assert corpus_bleu([[]], [[["a"]]]) == 0.0
