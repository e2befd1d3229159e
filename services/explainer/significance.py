"""Significance of a unit's overlap with a label against random placement of its masks.

Follows specs/verification.md ("Significance of a detector"). Everything is counted on
the layer's raw activation grid (P = h·w cells): an upsampled mask moves in blocks of
pixels, so a per-pixel null would overstate significance.

- The unit's mask in image i is its raw map above its threshold (NetDissect's T_u, or
  the image's own percentile in the per_image mode), n_i cells; the label's mask is
  its label map downsampled to the grid (`spatial_masks.label_grid_masks`, manual
  fraction by default), l_i cells.
- Null: the unit's n_i cells placed uniformly at random among the P cells of each
  image, independently. The intersection X_i is then hypergeometric:
  E X_i = n_i·l_i / P, Var X_i = n_i(P − n_i)·l_i(P − l_i) / (P²(P − 1)), and the
  total X = Σ_i X_i has the sums of both (`null_moments`). Grid IoU = X / (A + L − X)
  with A = Σ n_i and L = Σ l_i fixed, so it grows with X: a test of X is a test of
  the IoU.
- Whole-image labels (scenes, textures: l_i is 0 or P in every image) overlap a mask
  however it is placed within an image, so placement has no variance for them. Their
  null moves the unit's mask areas across images instead (`area_shuffle_moments`):
  X = Σ_{i ∋ c} n_i is the sum of K of the N areas drawn without replacement,
  E X = K·n̄, Var X = K(N − K)/(N − 1)·σ²_n (the permutation null's exact moments for
  these labels).
- z = (X − E X − ½) / √Var X (continuity correction) and the one-sided p = P(Z ≥ z)
  of the normal approximation to the sum over images (`upper_p`; it underflows to 0
  beyond z ≈ 38). Pairs with Var X = 0 are not tested (an empty unit or label, one
  that fills every image, a unit with the same area in every image against a
  whole-image label).
- Benjamini–Hochberg at rate q over every tested (unit, label) pair of the layer
  (`benjamini_hochberg`): a unit's best label is significant when its pair passes.
- Check: a permutation null that keeps the masks' shapes, each permutation pairing
  the unit's masks with the label masks of other images (`permutation_p`).

Uniform placement ignores where in an image masks tend to lie. For masks independent
of the labels that are i.i.d. cells, z is standard (measured: mean −0.17, the
continuity correction, sd 0.97; 0.6% of pairs pass at q = 0.05). For spatially coherent
ones (a random 2×2 block on a 4×4 grid) both masks and object labels favour the
centre, so z is inflated (mean 0.90, sd 1.38) and 20% of pairs pass, while the
permutation null stays calibrated (5.0% at p <= 0.05): a significant label whose
permutation p is large is such a case (`significant_not_permutation` in the summary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from services.explainer.spatial_masks import Grid, popcount

# Cells of label masks unpacked at once in `GridOverlapTally.update` (bounds its memory).
_UNPACKED_CELLS = 1 << 24


def null_moments(
    mask_cells: np.ndarray, label_cells: np.ndarray, cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """(U, L) float64 mean and variance of X under random placement, summed over images.

    `mask_cells` (N, U) and `label_cells` (N, L) are n_i and l_i; `cells` is P.
    """
    n = np.asarray(mask_cells, dtype=np.float64)
    labels = np.asarray(label_cells, dtype=np.float64)
    mean = n.T @ labels / cells
    if cells < 2:
        return mean, np.zeros_like(mean)
    variance = (n * (cells - n)).T @ (labels * (cells - labels)) / (cells * cells * (cells - 1))
    return mean, variance


def area_shuffle_moments(
    mask_area: np.ndarray, mask_squares: np.ndarray, images: int, holding: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(U, L) mean and variance of Σ_{i ∋ c} n_i when the unit's areas are shuffled.

    `mask_area` (U,) Σ_i n_i and `mask_squares` (U,) Σ_i n_i² over `images` = N;
    `holding` (L,) K_c, the images that hold each whole-image label.
    """
    mean_n = mask_area / images
    spread = np.maximum(mask_squares / images - mean_n**2, 0.0)
    k = np.asarray(holding, dtype=np.float64)
    finite = k * (images - k) / max(images - 1, 1)
    return mean_n[:, None] * k[None, :], spread[:, None] * finite[None, :]


def z_scores(observed: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """(...) float64 z = (X − E − ½) / √Var, NaN where Var = 0 (not tested)."""
    tested = variance > 0
    return np.where(
        tested, (observed - mean - 0.5) / np.sqrt(np.where(tested, variance, 1.0)), np.nan
    )


def upper_p(z: np.ndarray) -> np.ndarray:
    """(...) float64 one-sided normal p = P(Z ≥ z); 1 where z is NaN (not tested)."""
    return np.where(np.isnan(z), 1.0, norm.sf(np.nan_to_num(z)))


def benjamini_hochberg(p_values: np.ndarray, q: float) -> float:
    """The Benjamini–Hochberg cut-off: pairs with p <= it pass at rate q; -1 when none does.

    `p_values` (m,) of the tested pairs.
    """
    p = np.sort(np.asarray(p_values, dtype=np.float64).reshape(-1))
    m = len(p)
    below = np.flatnonzero(p <= q * np.arange(1, m + 1) / max(m, 1))
    return float(p[below[-1]]) if len(below) else -1.0


def grid_iou(intersection: np.ndarray, mask_area: np.ndarray, label_area: np.ndarray) -> np.ndarray:
    """IoU = X / (A + L − X) of broadcastable counts; 0 where the union is empty."""
    union = mask_area + label_area - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-300), 0.0)


def permutation_p(
    unit_bits: np.ndarray,
    label_bits: np.ndarray,
    permutations: int,
    rng: np.random.Generator,
) -> float:
    """(1 + #{X_π ≥ X}) / (1 + R): the unit's masks permuted across images R times.

    `unit_bits` and `label_bits` (N, W) uint64 bitboards of one unit and one label;
    X_π = Σ_i |m_π(i) ∩ l_i|.
    """
    observed = int(popcount(unit_bits & label_bits).sum())
    # Only images where the unit fires matter: the others add nothing to any X_π.
    firing = np.flatnonzero(popcount(unit_bits) > 0)
    masks = unit_bits[firing]
    as_high = 0
    for _ in range(permutations):
        where = rng.choice(len(label_bits), size=len(firing), replace=False)
        as_high += int(popcount(masks & label_bits[where]).sum()) >= observed
    return (1 + as_high) / (1 + permutations)


@dataclass(frozen=True)
class GridOverlap:
    """Overlap counts of a block of units with every label, and their null moments.

    The null places each mask at random within its image, or, for whole-image labels,
    shuffles the unit's mask areas across images.
    """

    first_unit: int  # global index of the block's first unit
    intersection: np.ndarray  # (U, L) float64 X = Σ_i |m_i ∩ l_i|
    expected: np.ndarray  # (U, L) float64 E X under the null
    variance: np.ndarray  # (U, L) float64 Var X under the null
    mask_area: np.ndarray  # (U,) float64 A = Σ_i n_i
    permutation_p: np.ndarray  # (U,) float64 for each unit's tested label, NaN when not asked


class GridOverlapTally:
    """Stream a block's grid masks (image chunks) against the layer's label grid masks.

    `label_masks` (L, N, W) uint64 bitboards of every tested label on `grid`. With
    `permutations`, the block's masks are kept as bitboards (U·N·W words) for the check.
    """

    def __init__(
        self,
        n_units: int,
        label_masks: np.ndarray,
        grid: Grid,
        first_unit: int = 0,
        permutations: int = 0,
    ) -> None:
        self.permutations = permutations
        self.label_masks = label_masks
        self.grid = grid
        self.first_unit = first_unit
        self.label_cells = popcount(label_masks).T  # (N, L)
        full = self.label_cells == grid.cells
        # Whole-image labels: empty or full in every image, full in at least one.
        self.whole = ((self.label_cells == 0) | full).all(axis=0) & full.any(axis=0)
        self.holding = full.sum(axis=0)  # (L,) K_c
        shape = (n_units, len(label_masks))
        self._intersection = np.zeros(shape)
        self._mean = np.zeros(shape)
        self._variance = np.zeros(shape)
        self._mask_area = np.zeros(n_units)
        self._mask_squares = np.zeros(n_units)
        self._images = 0
        self._unit_bits: list[np.ndarray] = []

    def update(self, i0: int, masks: np.ndarray) -> None:
        """Add the (n, U, h, w) bool grid masks of images [i0, i0 + n)."""
        n, n_units = masks.shape[:2]
        cells = self.grid.cells
        flat = masks.reshape(n, n_units, cells)
        n_labels = len(self.label_masks)
        mask_cells = flat.sum(axis=2)
        mean, variance = null_moments(mask_cells, self.label_cells[i0 : i0 + n], cells)
        self._mean += mean
        self._variance += variance
        self._mask_area += mask_cells.sum(axis=0)
        self._mask_squares += (mask_cells.astype(np.float64) ** 2).sum(axis=0)
        self._images += n
        group = max(1, _UNPACKED_CELLS // max(1, n_labels * cells))
        for g0 in range(0, n, group):
            g1 = min(g0 + group, n)
            labels = self.grid.unpack(self.label_masks[:, i0 + g0 : i0 + g1])
            units = flat[g0:g1].transpose(1, 0, 2).reshape(n_units, -1).astype(np.float32)
            # Counts below 2**24 per product: exact in float32.
            self._intersection += units @ labels.reshape(n_labels, -1).astype(np.float32).T
        if self.permutations:
            self._unit_bits.append(self.grid.pack(masks).transpose(1, 0, 2))

    def result(self, tested_labels: np.ndarray) -> GridOverlap:
        """The block's `GridOverlap`; the permutation check of each unit's `tested_labels`.

        `tested_labels` (U,) int64: each unit's label row in `label_masks` (-1: none).
        The permutations of unit u draw from a generator seeded by its global index.
        """
        checked = np.full(len(self._mask_area), np.nan)
        if self.permutations:
            unit_bits = np.concatenate(self._unit_bits, axis=1)  # (U, N, W)
            for u, label in enumerate(tested_labels.tolist()):
                if label >= 0:
                    rng = np.random.default_rng(self.first_unit + u)
                    checked[u] = permutation_p(
                        unit_bits[u], self.label_masks[label], self.permutations, rng
                    )
        shuffled_mean, shuffled_variance = area_shuffle_moments(
            self._mask_area, self._mask_squares, max(self._images, 1), self.holding
        )
        return GridOverlap(
            first_unit=self.first_unit,
            intersection=self._intersection.copy(),
            expected=np.where(self.whole[None, :], shuffled_mean, self._mean),
            variance=np.where(self.whole[None, :], shuffled_variance, self._variance),
            mask_area=self._mask_area.copy(),
            permutation_p=checked,
        )
