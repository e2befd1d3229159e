"""Ablation scoring's known answers and its loss arithmetic against a plain forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.explainer import ablation
from services.explainer.methods.ablation import layer_summary

K, U = 5, 6


def _data(seed: int, n: int) -> tuple[ablation.AblationData, ablation.Head]:
    rng = np.random.default_rng(seed)
    pooled = np.abs(rng.normal(size=(n, U)))
    head = ablation.Head(rng.normal(size=(K, U)).astype(np.float32),
                         rng.normal(size=K).astype(np.float32))
    logits = pooled @ head.weight.T.astype(np.float64) + head.bias
    labels = np.argmax(logits + rng.normal(scale=1.0, size=logits.shape), axis=1)
    return ablation.AblationData(torch.as_tensor(pooled), torch.as_tensor(labels)), head


VAL, HEAD = _data(0, 40)
TEST, _ = _data(1, 60)
UNITS = np.arange(U)


def test_losses_equal_a_forward_pass_with_the_unit_replaced() -> None:
    values = torch.full((len(TEST.labels), U), 0.25, dtype=torch.float64)
    got = ablation.LossChange(TEST, HEAD, UNITS, 1.1).losses(values)
    for k in range(U):
        changed = TEST.pooled.clone()
        changed[:, k] = 0.25
        logits = changed @ torch.as_tensor(HEAD.weight, dtype=torch.float64).T + torch.as_tensor(
            HEAD.bias, dtype=torch.float64
        )
        expected = torch.nn.functional.cross_entropy(logits / 1.1, TEST.labels, reduction="none")
        torch.testing.assert_close(got[:, k], expected)


def test_optim_with_the_units_own_activation_is_exact() -> None:
    own_val, own_test = VAL.pooled.numpy(), TEST.pooled.numpy()
    scale, offset = ablation.fit_scale(
        ablation.LossChange(VAL, HEAD, UNITS, 1.1), VAL.pooled.clone()
    )
    assert scale.tolist() == [1.0] * U and offset.tolist() == [0.0] * U
    alpha = ablation.unit_alphas(VAL, TEST, HEAD, UNITS, own_val, own_test, "optim", 1.1)
    assert alpha.tolist() == [1.0] * U


def test_norm_with_a_constant_explanation_is_exactly_mean_ablation() -> None:
    alpha = ablation.unit_alphas(
        VAL, TEST, HEAD, UNITS, np.full((40, U), 3.0), np.full((60, U), 3.0), "norm", 1.1
    )
    assert alpha.tolist() == [0.0] * U


@pytest.mark.parametrize("variant", ["optim", "norm"])
def test_a_noisy_explanation_lies_between_and_a_missing_one_is_nan(variant: str) -> None:
    rng = np.random.default_rng(2)
    val_p = VAL.pooled.numpy() + rng.normal(scale=0.3, size=(40, U))
    test_p = TEST.pooled.numpy() + rng.normal(scale=0.3, size=(60, U))
    test_p[:, 0] = np.nan
    alpha = ablation.unit_alphas(VAL, TEST, HEAD, UNITS, val_p, test_p, variant, 1.1)  # type: ignore[arg-type]
    assert np.isnan(alpha[0])
    assert np.all((alpha[1:] > 0.0) & (alpha[1:] < 1.0)), alpha
    perfect = ablation.unit_alphas(
        VAL, TEST, HEAD, UNITS, VAL.pooled.numpy(), TEST.pooled.numpy(), variant, 1.1  # type: ignore[arg-type]
    )
    assert np.all(perfect[1:] > alpha[1:])


def test_explanations_of_one_unit_fitted_together_equal_fits_apart() -> None:
    rng = np.random.default_rng(3)
    val_p = VAL.pooled.numpy() + rng.normal(scale=0.3, size=(40, U))
    test_p = TEST.pooled.numpy() + rng.normal(scale=0.3, size=(60, U))
    apart = ablation.unit_alphas(VAL, TEST, HEAD, UNITS, val_p, test_p, "optim", 1.1)
    both = ablation.unit_alphas(
        VAL, TEST, HEAD, np.concatenate([UNITS, UNITS]), np.hstack([val_p, VAL.pooled.numpy()]),
        np.hstack([test_p, TEST.pooled.numpy()]), "optim", 1.1,
    )
    np.testing.assert_array_equal(both[:U], apart)
    assert both[U:].tolist() == [1.0] * U


def test_a_unit_the_head_ignores_is_not_scored() -> None:
    weight = HEAD.weight.copy()
    weight[:, 2] = 0.0
    head = ablation.Head(weight, HEAD.bias)
    alpha = ablation.unit_alphas(
        VAL, TEST, head, UNITS, VAL.pooled.numpy(), TEST.pooled.numpy(), "optim", 1.1
    )
    assert np.isnan(alpha[2]) and np.isfinite(np.delete(alpha, 2)).all()


def test_layer_summary_mean_and_sem_over_finite_scores() -> None:
    rows = {
        0: {"unit": 0, "ablation": {"netdissect": 0.2, "linear": "NaN"}},
        1: {"unit": 1, "ablation": {"netdissect": 0.4, "linear": 0.5}},
        2: {"unit": 2, "ablation": {}},
    }
    summary = layer_summary(rows, "")
    assert summary["ablation_mean"] == pytest.approx({"netdissect": 0.3, "linear": 0.5})
    assert summary["ablation_sem"]["netdissect"] == pytest.approx(0.1)
    assert summary["ablation_sem"]["linear"] == 0.0
    assert summary["ablation_scored_units"] == {"netdissect": 2, "linear": 1}
