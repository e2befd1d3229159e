import pytest

from services.captioner.vocabulary import (
    SPECIAL_TOKENS,
    Vocabulary,
    VocabularyMismatch,
    detokenize,
    tokenize,
)
from services.common.errors import InvalidArgument


def test_tokenize_lowercases_and_keeps_punctuation() -> None:
    assert tokenize("A Red, round THING.") == ["a", "red", ",", "round", "thing", "."]
    assert detokenize(["a", "red", ",", "round", "thing", "."]) == "a red, round thing."


def test_build_orders_by_frequency_then_alphabetically_after_specials() -> None:
    vocabulary = Vocabulary.build(["b a", "a c", "a b", "d"])
    assert vocabulary.tokens == (*SPECIAL_TOKENS, "a", "b", "c", "d")
    assert (vocabulary.pad, vocabulary.start, vocabulary.stop, vocabulary.unk) == (0, 1, 2, 3)


def test_encode_decode_and_unknown_words() -> None:
    vocabulary = Vocabulary.build(["a red circle"])
    ids = vocabulary.encode("A red square")
    assert ids == [vocabulary.tokens.index("a"), vocabulary.tokens.index("red"), vocabulary.unk]
    # decoding stops at the first stop and skips start/pad
    assert vocabulary.decode([vocabulary.start, *ids[:2], vocabulary.stop, ids[0]]) == "a red"


def test_round_trips_through_plain_list() -> None:
    vocabulary = Vocabulary.build(["a red circle", "two blue squares."])
    tokens = vocabulary.to_list()
    assert all(type(t) is str for t in tokens)
    assert Vocabulary.from_list(tokens) == vocabulary


def test_rejects_lists_without_specials_first() -> None:
    with pytest.raises(InvalidArgument):
        Vocabulary.from_list(["a", *SPECIAL_TOKENS])


def test_require_same_names_the_difference() -> None:
    a = Vocabulary.build(["red circle"])
    b = Vocabulary.build(["red square"])
    a.require_same(Vocabulary.build(["red circle"]), "lm")
    with pytest.raises(VocabularyMismatch, match="token 4"):
        a.require_same(b, "lm")
    with pytest.raises(VocabularyMismatch, match="6 tokens vs 7"):
        a.require_same(Vocabulary.build(["red circle star"]), "lm")
