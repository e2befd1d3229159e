"""Ablation scoring (specs/verification.md; reference: Linear-Explanations' simulate_ablation).

A unit k of a layer whose pooled activations a (n, U) feed the classifier head
(logits = a·Wᵀ + b, W (K, U), b (K,)) is replaced by a value v (n,), and the change
of the loss L = CE(logits / T, y) per image is compared with mean-ablation:

- L_orig: the unit as it is; baseline: v = μ_val(a_k), base = Σ_test |L_base − L_orig|;
- optim: v = c·ŷ_k + d, (c, d) from (1, 0) by Adam (lr 1e-2, 100 steps) minimising
  Σ_val |L_abl − L_orig|;
- norm: v = z(ŷ_k)·σ_val(a_k)·ρ_val + μ_val(a_k), ρ_val = Pearson(ŷ_k, a_k) on the
  validation images; z-scored with the validation split's mean and deviation of ŷ_k
  (the reference uses the test split's own: ours never looks at test statistics); a
  constant ŷ_k, or ρ_val undefined, gives v = μ_val (α = 0 exactly);
- α = 1 − Σ_test |L_abl − L_orig| / base: 1 perfect, 0 as mean-ablation, < 0 worse.
  NaN where base is 0 (the unit does not change the loss) or ŷ_k is missing.

Everything is float64 and vectorised over a block of units: changing unit k moves
the logits by (v − a_k)·W[:, k], so no forward pass is needed. With ŷ_k = a_k the
optim variant starts at zero loss difference, where |·| has zero gradient: (c, d)
stay (1, 0) and α is 1 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.common.spec_vocabulary import AblationVariant

STEPS = 100
LEARNING_RATE = 1e-2


@dataclass(frozen=True)
class Head:
    """The classifier head reading the layer's pooled activations."""

    weight: np.ndarray  # (K, U) float32
    bias: np.ndarray  # (K,) float32


@dataclass(frozen=True)
class AblationData:
    """One split's pooled activations of a block and the images' classes."""

    pooled: torch.Tensor  # (n, U) float64, every unit (the logits need them all)
    labels: torch.Tensor  # (n,) int64


class LossChange:
    """Σ_images |L(v) − L_orig| for a block of units on one split, constant parts computed once.

    `units` (B,) may repeat a unit (one column per explanation scored).
    """

    def __init__(
        self, data: AblationData, head: Head, units: np.ndarray, temperature: float
    ) -> None:
        # Copies: the head's arrays come read-only from Ray's object store.
        weight = torch.tensor(head.weight, dtype=torch.float64)
        bias = torch.tensor(head.bias, dtype=torch.float64)
        index = torch.as_tensor(units)
        self.logits = data.pooled @ weight.T + bias  # (n, K)
        self.columns = weight[:, index].T  # (B, K): what one unit adds per unit of activation
        self.acts = data.pooled[:, index]  # (n, B)
        self.labels = data.labels[:, None, None].expand(-1, len(units), 1)  # (n, B, 1)
        self.temperature = temperature
        self.original = self.losses(self.acts)

    def losses(self, values: torch.Tensor) -> torch.Tensor:
        """(n, B) CE(logits / T, y) with unit units[j] set to values[:, j], one at a time."""
        shift = (values - self.acts)[:, :, None] * self.columns[None, :, :]
        scaled = (self.logits[:, None, :] + shift) / self.temperature  # (n, B, K)
        return torch.logsumexp(scaled, dim=2) - scaled.gather(2, self.labels)[:, :, 0]

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) Σ_images |L(values) − L_orig|."""
        return (self.losses(values) - self.original).abs().sum(dim=0)


def fit_scale(val: LossChange, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) c and d of v = c·ŷ + d minimising Σ_val |L_abl − L_orig| (Adam from (1, 0))."""
    n_units = predicted.shape[1]
    scale = torch.ones(n_units, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(n_units, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([scale, offset], lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        # Units are independent terms of the sum, and Adam is elementwise: one fit per unit.
        val.total(scale * predicted + offset).sum().backward()
        optimizer.step()
    return scale.detach(), offset.detach()


def normalised(
    val_predicted: torch.Tensor, val_acts: torch.Tensor, predicted: torch.Tensor
) -> torch.Tensor:
    """(n, B) z(ŷ)·σ_val(a)·ρ_val + μ_val(a), validation statistics; μ_val where ŷ is flat."""
    mean_a, std_a = val_acts.mean(dim=0), val_acts.std(dim=0, unbiased=False)
    mean_p, std_p = val_predicted.mean(dim=0), val_predicted.std(dim=0, unbiased=False)
    x, y = val_predicted - mean_p, val_acts - mean_a
    denominator = torch.sqrt((x * x).sum(dim=0) * (y * y).sum(dim=0))
    flat = (val_predicted.amax(dim=0) == val_predicted.amin(dim=0)) | (denominator == 0)
    rho = torch.where(flat, 0.0, (x * y).sum(dim=0) / torch.where(flat, 1.0, denominator))
    z = (predicted - mean_p) / torch.where(flat, 1.0, std_p)
    scaled = z * std_a * rho + mean_a
    return torch.where(flat[None, :], mean_a[None, :].expand_as(predicted), scaled)


def unit_alphas(
    val: AblationData,
    test: AblationData,
    head: Head,
    units: np.ndarray,
    val_predicted: np.ndarray,
    test_predicted: np.ndarray,
    variant: AblationVariant,
    temperature: float,
) -> np.ndarray:
    """(B,) α of units `units` (B,) from ŷ on the validation (n_val, B) and test images.

    A unit may appear once per explanation scored: each column is fitted on its own.

    A unit whose ŷ holds NaN, or whose mean-ablation leaves the test loss unchanged,
    gets NaN.
    """
    missing = np.isnan(val_predicted).any(axis=0) | np.isnan(test_predicted).any(axis=0)
    val_p = torch.as_tensor(np.nan_to_num(val_predicted), dtype=torch.float64)
    test_p = torch.as_tensor(np.nan_to_num(test_predicted), dtype=torch.float64)
    val_change = LossChange(val, head, units, temperature)
    test_change = LossChange(test, head, units, temperature)
    mean_a = val_change.acts.mean(dim=0)
    base = test_change.total(mean_a[None, :].expand(len(test.labels), -1))
    if variant == "optim":
        scale, offset = fit_scale(val_change, val_p)
        values = scale * test_p + offset
    else:
        values = normalised(val_p, val_change.acts, test_p)
    with torch.no_grad():
        change = test_change.total(values)
    alpha = 1.0 - (change / torch.where(base > 0, base, 1.0)).numpy()
    alpha[missing | (base.numpy() <= 0)] = np.nan
    return alpha
