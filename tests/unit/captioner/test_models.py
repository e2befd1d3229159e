import pytest
import torch

from services.captioner.language_model import LanguageModel
from services.captioner.vocabulary import Vocabulary
from tests.unit.captioner.synthetic import small_models


def test_attention_weights_sum_to_one(vocabulary: Vocabulary) -> None:
    decoder, _ = small_models(vocabulary)
    features = torch.randn(3, 5, 24)  # k = 5 exemplars, S = 4 slots per unit
    memory = decoder.memory(features)
    state = decoder.initial_state(features)
    state = type(state)(state.h.expand(3, 4, -1), state.c.expand(3, 4, -1))
    tokens = torch.full((3, 4), vocabulary.start)
    log_probs, new_state, alpha = decoder.step(memory, tokens, state)
    assert alpha.shape == (3, 4, 5) and log_probs.shape == (3, 4, len(vocabulary))
    torch.testing.assert_close(alpha.sum(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(log_probs.exp().sum(dim=-1), torch.ones(3, 4))
    assert new_state.h.shape == (3, 4, 32)

    inputs = torch.tensor([[vocabulary.start, 4, 5, 6]] * 3)
    _, alphas = decoder(features, inputs)
    assert alphas.shape == (3, 4, 5)
    torch.testing.assert_close(alphas.sum(dim=-1), torch.ones(3, 4))


def test_initial_state_is_tanh_of_mean_exemplar(vocabulary: Vocabulary) -> None:
    decoder, _ = small_models(vocabulary)
    features = torch.randn(2, 5, 24)
    state = decoder.initial_state(features)
    expected = torch.tanh(decoder.init_h(features.mean(dim=1)))
    torch.testing.assert_close(state.h[:, 0], expected)


def _manual_log_prob(model: LanguageModel, ids: list[int]) -> float:
    inputs = torch.tensor([[model.vocabulary.start, *ids[:-1]]])
    log_probs = model(inputs)[0]
    return float(sum(log_probs[t, i] for t, i in enumerate(ids)))


def test_padding_with_extra_stops_does_not_change_log_p(vocabulary: Vocabulary) -> None:
    _, lm = small_models(vocabulary)
    stop, pad = vocabulary.stop, vocabulary.pad
    base = [4, 5, stop]
    rows = [
        base + [pad] * 4,
        base + [stop] * 4,
        [*base, stop, pad, stop, pad],
        [*base, 6, 7, 8, 9],
    ]
    with torch.no_grad():
        scores = lm.score(torch.tensor(rows))
        expected = _manual_log_prob(lm, base)
    torch.testing.assert_close(scores, torch.full((4,), expected))
    # the stop itself counts: a description without it scores differently
    with torch.no_grad():
        assert abs(float(lm.score(torch.tensor([[4, 5, pad]]))) - expected) > 1e-3


def test_unfinished_description_counts_all_its_tokens(vocabulary: Vocabulary) -> None:
    _, lm = small_models(vocabulary)
    ids = [4, 5, 6, 7]
    with torch.no_grad():
        score = float(lm.score(torch.tensor([ids])))
        assert score == pytest.approx(_manual_log_prob(lm, ids), abs=1e-5)


def test_scores_do_not_depend_on_batching(vocabulary: Vocabulary) -> None:
    _, lm = small_models(vocabulary)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, len(vocabulary), (9, 6), generator=generator)
    for row, stop_at in enumerate([0, 1, 5, 2, 3, 9, 4, 1, 9]):
        if stop_at < 6:
            tokens[row, stop_at] = vocabulary.stop
            tokens[row, stop_at + 1 :] = vocabulary.pad
    with torch.no_grad():
        whole = lm.score(tokens)
        torch.testing.assert_close(lm.score(tokens, batch_size=2), whole)
        for row in range(9):
            ids = tokens[row].tolist()
            ids = ids[: ids.index(vocabulary.stop) + 1] if vocabulary.stop in ids else ids
            assert float(whole[row]) == pytest.approx(_manual_log_prob(lm, ids), abs=1e-5)


def test_scores_of_rows_sharing_prefixes_equal_scores_alone(vocabulary: Vocabulary) -> None:
    # score() computes each distinct prefix once; a row's score must be exactly what
    # it gets when scored alone.
    _, lm = small_models(vocabulary)
    stop, pad = vocabulary.stop, vocabulary.pad
    rows = [
        [4, 5, 6, 7, stop],
        [4, 5, 6, 7, 8],
        [4, 5, 6, stop, pad],
        [4, 5, 6, 7, stop],  # a duplicate
        [5, 5, 6, 7, stop],
        [4, pad, 6, stop, pad],  # padding inside is read but not counted
        [pad, pad, pad, pad, pad],  # nothing counted
        [4, 5, 9, 9, 9],
    ]
    tokens = torch.tensor(rows)
    with torch.no_grad():
        together = lm.score(tokens)
        alone = torch.cat([lm.score(tokens[i : i + 1]) for i in range(len(rows))])
        assert torch.equal(together, alone)
        assert float(together[6]) == 0.0
        assert float(together[0]) == pytest.approx(_manual_log_prob(lm, rows[0]), abs=1e-5)
        assert float(together[5]) == pytest.approx(
            _manual_log_prob(lm, [4, pad, 6, stop])
            - float(lm(torch.tensor([[vocabulary.start, 4]]))[0, 1, pad]),
            abs=1e-5,
        )
