import itertools
import math

import pytest
import torch

from services.captioner.captioner import Captioner, captions_csv
from services.captioner.decoder import CaptionDecoder, LSTMState
from services.captioner.decoding import (
    beam_search,
    decode_units,
    evaluating,
    rerank,
)
from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import SPECIAL_TOKENS, Vocabulary, VocabularyMismatch
from services.common.errors import InvalidArgument
from tests.unit.captioner.synthetic import small_models, tiny_encoder

AB = Vocabulary((*SPECIAL_TOKENS, "a", "b"))


def teacher_forced_logp(decoder: CaptionDecoder, features: torch.Tensor, ids: list[int]) -> float:
    """Σ log p(w_t | w_<t, E) of one unit's hypothesis, through its stop if any."""
    vocabulary = decoder.vocabulary
    if vocabulary.stop in ids:
        ids = ids[: ids.index(vocabulary.stop) + 1]
    inputs = torch.tensor([[vocabulary.start, *ids[:-1]]])
    with evaluating(decoder):
        log_probs, _ = decoder(features[None], inputs)
    return float(sum(log_probs[0, t, i] for t, i in enumerate(ids)))


def constant_models(
    decoder_probs: dict[str, float], lm_probs: dict[str, float]
) -> tuple[CaptionDecoder, LanguageModel]:
    """Models over AB whose next-token distribution ignores the input."""
    decoder = CaptionDecoder(AB, 4, embedding_dim=4, hidden_dim=4, attention_dim=4)
    lm = LanguageModel(AB, embedding_dim=4, hidden_dim=4)
    for model, probs in ((decoder, decoder_probs), (lm, lm_probs)):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.output.bias.fill_(-30.0)
            for token, prob in probs.items():
                model.output.bias[AB.tokens.index(token)] = math.log(prob)
    return decoder, lm


def test_rerank_prefers_the_specific_caption_when_lambda_is_positive() -> None:
    # candidate 0: likely under p(d|E) and generic (likely under p(d));
    # candidate 1: less likely under p(d|E) but much more specific.
    logp_caption = torch.tensor([[-1.0, -1.5]])
    logp_lm = torch.tensor([[-1.0, -5.0]])
    assert rerank(logp_caption, logp_lm, 0.0).item() == 0
    assert rerank(logp_caption, logp_lm, 0.2).item() == 1  # -0.8 vs -0.5


def test_pmi_term_changes_the_winner_in_a_hand_built_two_candidate_case() -> None:
    # One step, beam 2: the candidates are "a" (p=.5) and "b" (p=.3). The language
    # model finds "a" generic (p=.9) and "b" rare (p=.01):
    #   λ=0:   a -0.69 > b -1.20
    #   λ=0.2: a -0.69+0.2·0.11 = -0.67 < b -1.20+0.2·4.61 = -0.28
    decoder, lm = constant_models(
        {"a": 0.5, "b": 0.3, "<stop>": 0.2}, {"a": 0.9, "b": 0.01, "<stop>": 0.09}
    )
    features = torch.zeros(1, 3, 4)
    plain = decode_units(decoder, lm, features, beam_size=2, max_tokens=1, pmi_lambda=0.0)
    pmi = decode_units(decoder, lm, features, beam_size=2, max_tokens=1, pmi_lambda=0.2)
    assert plain[0].caption == "a" and pmi[0].caption == "b"
    assert pmi[0].logp_caption == pytest.approx(math.log(0.3), abs=1e-4)
    assert pmi[0].logp_lm == pytest.approx(math.log(0.01), abs=1e-4)


def test_lambda_zero_returns_the_top_beam(vocabulary: Vocabulary) -> None:
    decoder, lm = small_models(vocabulary)
    features = torch.randn(8, 5, 24)
    with evaluating(decoder):
        beams = beam_search(decoder, features, beam_size=10, max_tokens=8)
    assert torch.all(beams.logp[:, :-1] >= beams.logp[:, 1:])  # sorted, slot 0 on top
    results = decode_units(decoder, lm, features, beam_size=10, max_tokens=8, pmi_lambda=0.0)
    for unit, result in enumerate(results):
        assert list(result.tokens) == vocabulary.words(beams.tokens[unit, 0].tolist())
        assert result.logp_caption == pytest.approx(float(beams.logp[unit, 0]))
    # the prior does matter here, so the check above is not vacuous
    weighted = decode_units(decoder, lm, features, beam_size=10, max_tokens=8, pmi_lambda=1.0)
    assert [r.tokens for r in weighted] != [r.tokens for r in results]


def test_beam_wider_than_the_hypothesis_space_is_exhaustive_and_scores_are_exact() -> None:
    torch.manual_seed(3)
    decoder = CaptionDecoder(AB, 6, embedding_dim=4, hidden_dim=8, attention_dim=4).eval()
    features = torch.randn(2, 3, 6)
    stop, generable = AB.stop, [AB.stop, AB.unk, 4, 5]
    # every hypothesis of at most 3 tokens: stopped early, or 3 tokens without stop
    space = [
        list(seq)
        for n in (1, 2, 3)
        for seq in itertools.product(generable, repeat=n)
        if stop not in seq[:-1] and (n == 3 or seq[-1] == stop)
    ]
    assert len(space) == 40
    with evaluating(decoder):
        beams = beam_search(decoder, features, beam_size=50, max_tokens=3)
    for unit in range(2):
        expected = {tuple(seq): teacher_forced_logp(decoder, features[unit], seq) for seq in space}
        found = {}
        for slot in range(50):
            if math.isfinite(float(beams.logp[unit, slot])):
                ids = beams.tokens[unit, slot].tolist()
                seq = tuple(ids[: ids.index(stop) + 1] if stop in ids else ids)
                found[seq] = float(beams.logp[unit, slot])
        assert found.keys() == expected.keys()
        for seq, logp in found.items():
            assert logp == pytest.approx(expected[seq], abs=1e-4)


def test_hypotheses_are_padded_after_stop_and_scored_through_it(vocabulary: Vocabulary) -> None:
    decoder, _ = small_models(vocabulary, stop_bias=2.0)
    features = torch.randn(3, 4, 24)
    with evaluating(decoder):
        beams = beam_search(decoder, features, beam_size=6, max_tokens=5)
    assert beams.tokens.shape[2] <= 5
    checked = 0
    for unit in range(3):
        for slot in range(6):
            ids = beams.tokens[unit, slot].tolist()
            if vocabulary.stop in ids:
                tail = ids[ids.index(vocabulary.stop) + 1 :]
                assert set(tail) <= {vocabulary.pad}
                checked += 1
            expected = teacher_forced_logp(decoder, features[unit], ids)
            assert float(beams.logp[unit, slot]) == pytest.approx(expected, abs=1e-4)
    assert checked > 0


def test_batched_decoding_equals_per_unit_decoding(vocabulary: Vocabulary) -> None:
    decoder, lm = small_models(vocabulary)
    features = torch.randn(6, 5, 24)
    batched = decode_units(decoder, lm, features, beam_size=8, max_tokens=7)
    single = [
        decode_units(decoder, lm, features[u : u + 1], beam_size=8, max_tokens=7)[0]
        for u in range(6)
    ]
    assert len({r.caption for r in batched}) > 1  # units differ, so order matters
    # identical, not merely close: search-time computation is row-wise
    assert batched == single


def test_batched_decoding_equals_per_unit_decoding_at_spec_sizes() -> None:
    # Spec-sized layers (hidden 512, attention 512) with a 60-word vocabulary: the
    # matrix products are large enough for BLAS to pick different kernels by batch
    # size, which must not change any hypothesis's numbers.
    vocabulary = Vocabulary.build(f"w{i}" for i in range(60))
    torch.manual_seed(0)
    decoder = CaptionDecoder(vocabulary, 64).eval()
    lm = LanguageModel(vocabulary).eval()
    features = torch.randn(5, 15, 64, generator=torch.Generator().manual_seed(1))
    batched = decode_units(decoder, lm, features, beam_size=12, max_tokens=6)
    single = [
        decode_units(decoder, lm, features[u : u + 1], beam_size=12, max_tokens=6)[0]
        for u in range(5)
    ]
    assert batched == single


def test_search_computations_are_row_wise() -> None:
    # What one unit's hypotheses get must not depend on how many others share the
    # call (BLAS rounds a 1-row product differently from a 12-row one).
    vocabulary = Vocabulary.build(f"w{i}" for i in range(60))
    torch.manual_seed(0)
    decoder = CaptionDecoder(vocabulary, 64).eval()
    features = torch.randn(12, 15, 64)
    with evaluating(decoder):
        many, one = decoder.search_tables(features), decoder.search_tables(features[:1])
        assert torch.equal(many.initial.h[:1], one.initial.h)
        assert torch.equal(many.keys[:1], one.keys)
        h, c = many.initial
        gates = decoder.state_gates(many, torch.arange(12), h)
        assert torch.equal(gates[:1], decoder.state_gates(one, torch.arange(1), h[:1]))
        tokens = torch.arange(12) + 4
        state, log_probs = decoder.expand(many, gates, c, torch.arange(12), tokens)
        state_one, log_probs_one = decoder.expand(
            one, gates[:1], c[:1], torch.arange(1), tokens[:1]
        )
    assert torch.equal(state.h[:1], state_one.h)
    assert torch.equal(log_probs[:1], log_probs_one)


def test_beam_search_does_not_depend_on_unit_grouping(vocabulary: Vocabulary) -> None:
    decoder, _ = small_models(vocabulary, stop_bias=1.0)  # groups finish at different steps
    features = torch.randn(7, 5, 24)
    with evaluating(decoder):
        whole = beam_search(decoder, features, beam_size=6, max_tokens=8)
        grouped = beam_search(decoder, features, beam_size=6, max_tokens=8, group_size=3)
    assert torch.equal(grouped.tokens, whole.tokens)
    assert torch.equal(grouped.logp, whole.logp)


def test_search_step_matches_the_training_step(vocabulary: Vocabulary) -> None:
    # Beam search evaluates the decoder step in pieces (per-parent gates, per-token
    # table, tanh through sigmoid); it must be the same function as `step`.
    decoder, _ = small_models(vocabulary)
    features = torch.randn(3, 5, 24)
    h, c = torch.randn(3, 4, 32).tanh(), torch.randn(3, 4, 32)
    tokens = torch.randint(3, len(vocabulary), (3, 4))
    with evaluating(decoder):
        expected, state, _ = decoder.step(decoder.memory(features), tokens, LSTMState(h, c))
        tables = decoder.search_tables(features)
        units = torch.arange(3).repeat_interleave(4)
        gates = decoder.state_gates(tables, units, h.flatten(0, 1))
        nodes = torch.arange(12)
        got_state, got = decoder.expand(tables, gates, c.flatten(0, 1), nodes, tokens.flatten())
    torch.testing.assert_close(got, expected.flatten(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state.h, state.h.flatten(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state.c, state.c.flatten(0, 1), atol=1e-5, rtol=1e-5)


def test_decoding_is_deterministic(vocabulary: Vocabulary) -> None:
    decoder, lm = small_models(vocabulary)
    decoder.train()  # decoding must switch dropout off and restore the mode
    features = torch.randn(4, 5, 24)
    first = decode_units(decoder, lm, features, beam_size=5, max_tokens=6)
    assert first == decode_units(decoder, lm, features, beam_size=5, max_tokens=6)
    assert decoder.training


def test_vocabulary_mismatch_between_decoder_and_lm_is_an_error(vocabulary: Vocabulary) -> None:
    decoder, _ = small_models(vocabulary)
    other = LanguageModel(
        Vocabulary.build(["a different vocabulary"]), embedding_dim=4, hidden_dim=4
    )
    with pytest.raises(VocabularyMismatch, match=r"language_model\.vocabulary"):
        decode_units(decoder, other, torch.randn(1, 5, 24))
    encoder = tiny_encoder()
    decoder = CaptionDecoder(vocabulary, encoder.feature_dim)
    with pytest.raises(VocabularyMismatch):
        Captioner(encoder, decoder, other)


def test_invalid_decoding_parameters_name_the_field(vocabulary: Vocabulary) -> None:
    decoder, lm = small_models(vocabulary)
    with pytest.raises(InvalidArgument, match="beam"):
        decode_units(decoder, lm, torch.randn(1, 5, 24), beam_size=0)
    with pytest.raises(InvalidArgument, match="pmi_lambda"):
        decode_units(decoder, lm, torch.randn(1, 5, 24), pmi_lambda=-1.0)


def test_captioner_captions_units_from_images_and_masks(vocabulary: Vocabulary) -> None:
    encoder = tiny_encoder()
    decoder, lm = small_models(vocabulary, feature_dim=encoder.feature_dim)
    captioner = Captioner(encoder, decoder, lm)
    images, masks = torch.rand(3, 4, 3, 32, 32), torch.ones(3, 4, 1, 32, 32)
    results = captioner.caption(images, masks, beam_size=5, max_tokens=6)
    features = encoder.encode_units(images, masks)
    assert results == decode_units(decoder, lm, features, beam_size=5, max_tokens=6)
    with pytest.raises(InvalidArgument, match="masks"):
        captioner.caption(images, masks[:, :2])


def test_captions_csv() -> None:
    expected = 'layer,unit,description\nlayer4,7,"red, round"\n'
    assert captions_csv("layer4", [7], ["red, round"]) == expected
    with pytest.raises(InvalidArgument, match="units"):
        captions_csv("layer4", [7, 8], ["red, round"])
