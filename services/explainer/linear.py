"""Linear explanations (LE): each unit as a sparse weighted sum of concepts.

Spec: specs/linear.md (Oikarinen & Weng, ICML 2024). Who runs what:

1. once per probe set: the concept matrix P (N images, C concepts) — `label_matrix` from the
   stored label chunks (LE(Label)), or `clip_concept_matrix` with (a, b) from
   `calibrate_sigmoid` (LE(CLIP)) — then `concept_filter` to drop unusable columns, and
   `split_images` (the caller persists the split);
2. once per layer: `concept_moments(P, split)`, the train/val covariances every block shares;
3. once per unit block: `fit_units(P, activations, split, moments)`, one `LinearExplanation`
   per unit.

`fit_units` solves everything for all units of the block at once: the elastic net that ranks
concepts is a batched coordinate descent on the train Gram matrix (`elastic_net`), and the
greedy selection scores every unit's candidates from the covariance matrices, so no step
touches the N × C data per unit. Both Gram matrices are C × C float64 (C = 5,000 → 200 MB
each).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from services.common.errors import InvalidArgument
from services.common.probe_format import LabelChunk
from services.common.spec_vocabulary import LINEAR_MAX_CONCEPTS

ALPHA = 0.99
LAMBDA = 0.05 / 0.99
MAX_CONCEPTS = LINEAR_MAX_CONCEPTS
CANDIDATES = 10
MIN_GAIN = 0.02
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
# Sigmoid calibration grid: a ∈ {0.1, 0.25, 0.5, 0.75, 1, 2, 4, …, 150}, b ∈ [-1, 1] step 0.01.
A_GRID = (0.1, 0.25, 0.5, 0.75, 1.0, *(float(a) for a in range(2, 151, 2)))
B_GRID = tuple(round(b / 100, 2) for b in range(-100, 101))
# Concept filter: mean of the top 5 values at least 0.5, standard deviation above 1e-5.
FILTER_TOP = 5
FILTER_MIN_TOP_MEAN = 0.5
FILTER_MIN_STD = 1e-5
# Largest KKT violation of an elastic-net solution (standardised units).
ENET_TOLERANCE = 1e-9

# Coordinate-descent sweeps between two exact solves of the units' supports, and rounds
# of both at most (a few suffice; the cap only guards against an unreachable tolerance).
_SWEEPS = 100
_ROUNDS = 100
# Rows per chunk when a (rows, C) block of P is converted to float64.
_ROW_CHUNK = 4096
# Histogram bins for the calibration's BCE: each bin stands for its values' mean, which
# changes a loss term by at most (a·bin width)²/32 (< 4e-6 for a = 150 over a range of 0.5).
_CALIBRATION_BINS = 8192


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """A seeded train/val/test split of the probe images (sorted index arrays)."""

    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (stored under `keys.split`)."""
        return {
            "seed": self.seed,
            "train": self.train.tolist(),
            "val": self.val.tolist(),
            "test": self.test.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageSplit:
        """Build from the dict written by `to_json`."""
        return cls(
            seed=int(data["seed"]),
            train=np.asarray(data["train"], dtype=np.int64),
            val=np.asarray(data["val"], dtype=np.int64),
            test=np.asarray(data["test"], dtype=np.int64),
        )


@dataclass(frozen=True, eq=False)
class ConceptMoments:
    """Means and covariances (divided by n) of P's columns on train and on val."""

    train_mean: np.ndarray  # (C,) float64
    train_cov: np.ndarray  # (C, C) float64
    val_mean: np.ndarray  # (C,) float64
    val_cov: np.ndarray  # (C, C) float64


@dataclass(frozen=True)
class LinearExplanation:
    """â(x) = Σ weights[i]·P[x, concepts[i]] + bias, weights in descending order.

    `val_correlation` is Pearson ρ of â with the unit on the val split (0.0 when no
    concept was selected).
    """

    concepts: tuple[int, ...]
    weights: tuple[float, ...]
    bias: float
    val_correlation: float

    def describe(self, names: Sequence[str]) -> str:
        """The explanation as text, e.g. `0.61·dog + 0.22·cat + 0.05`."""
        return format_explanation([names[c] for c in self.concepts], self.weights, self.bias)


def format_explanation(names: Sequence[str], weights: Sequence[float], bias: float) -> str:
    """`0.61·dog + 0.22·cat + 0.05`: terms by descending weight, then the bias; 2 decimals."""
    terms = sorted(zip(weights, names, strict=True), key=lambda term: -term[0])
    text = ""
    for weight, name in terms:
        text += _signed(weight, first=not text) + f"·{name}"
    return text + _signed(bias, first=not text)


def _signed(value: float, first: bool) -> str:
    if first:
        return f"{value:.2f}"
    return f" - {-value:.2f}" if value < 0 else f" + {value:.2f}"


# --- concept matrices -----------------------------------------------------------------


def label_matrix(
    chunks: Iterable[LabelChunk],
    n_images: int,
    concept_numbers: Sequence[int],
    coverage: bool = False,
) -> np.ndarray:
    """LE(Label): (N, C) float32, column c for label number `concept_numbers[c]`.

    P[i, c] = 1 when image i carries the label as an image-level label or on any pixel of
    any plane; with `coverage`, pixel labels count the fraction of the mask's pixels they
    cover instead (a pixel labelled on several planes counts once; image-level labels count
    1). `chunks` must cover images [0, n_images) exactly once, e.g. every stored label chunk
    in order; labels not in `concept_numbers` are ignored.
    """
    numbers = np.asarray(concept_numbers, dtype=np.int64)
    if numbers.size and numbers.min() < 1:
        raise InvalidArgument("label number 0 is never a concept", field="concept_numbers")
    column_of = np.full(int(numbers.max(initial=0)) + 1, -1, dtype=np.int64)
    column_of[numbers] = np.arange(len(numbers))
    out = np.zeros((n_images, len(numbers)), dtype=np.float32)
    seen = np.zeros(n_images, dtype=bool)
    for chunk in chunks:
        if chunk.i0 < 0 or chunk.i1 > n_images or seen[chunk.i0 : chunk.i1].any():
            raise InvalidArgument(
                f"label chunk [{chunk.i0}, {chunk.i1}) is outside [0, {n_images}) or repeated",
                field="label_chunks",
            )
        seen[chunk.i0 : chunk.i1] = True
        out[chunk.i0 : chunk.i1] = _chunk_labels(chunk, column_of, coverage)
    if not seen.all():
        raise InvalidArgument(
            f"label chunks miss {int((~seen).sum())} of {n_images} images", field="label_chunks"
        )
    return out


def _chunk_labels(chunk: LabelChunk, column_of: np.ndarray, coverage: bool) -> np.ndarray:
    """(n, C) float32 label values of one chunk; `column_of[label]` is its column or -1."""
    n_columns = int(column_of.max(initial=-1)) + 1
    n = len(chunk.pixel)
    planes = chunk.pixel.reshape(n, chunk.pixel.shape[1], -1)
    pixels = planes.shape[2]
    counts = np.zeros(n * n_columns, dtype=np.int64)
    image_row = np.repeat(np.arange(n), pixels).reshape(n, pixels)
    for plane in range(planes.shape[1]):
        labels = planes[:, plane]
        keep = labels > 0
        for earlier in range(plane):  # a pixel labelled on several planes counts once
            keep &= labels != planes[:, earlier]
        columns = _columns(labels, column_of)
        keep &= columns >= 0
        counts += np.bincount(image_row[keep] * n_columns + columns[keep], minlength=n * n_columns)
    found = counts.reshape(n, n_columns)
    values = (found / pixels if coverage else found > 0).astype(np.float32)
    columns = _columns(chunk.image, column_of)
    rows = np.broadcast_to(np.arange(n)[:, None], columns.shape)
    tagged = (chunk.image > 0) & (columns >= 0)
    values[rows[tagged], columns[tagged]] = 1.0
    return values


def _columns(labels: np.ndarray, column_of: np.ndarray) -> np.ndarray:
    """Column of every label number in `labels` (-1 for labels that are not concepts)."""
    inside = labels < len(column_of)
    return np.where(inside, column_of[np.where(inside, labels, 0)], -1)


def clip_concept_matrix(similarity: np.ndarray, a: float, b: float) -> np.ndarray:
    """LE(CLIP): P = σ(a·(S + b)) of the (N, C) CLIP cosines S, as (N, C) float32."""
    return expit(a * (np.asarray(similarity, dtype=np.float32) + np.float32(b))).astype(np.float32)


def calibrate_sigmoid(
    similarity: np.ndarray,
    labels: np.ndarray,
    a_grid: Sequence[float] = A_GRID,
    b_grid: Sequence[float] = B_GRID,
) -> tuple[float, float]:
    """Grid-search (a, b) minimising the mean binary cross-entropy of σ(a·(S + b)) vs labels.

    `similarity` (N, C') holds the CLIP cosines of the concepts the probe set labels and
    `labels` (N, C') those labels (> 0 counts as present); `b_grid` must be evenly spaced.
    The BCE sums run over a fine histogram of S per class (`_CALIBRATION_BINS` bins, each at
    its values' mean). For a fixed a the BCE is convex in b, so each a's best b is found by
    bisection over the grid. Ties go to the first (a, b) in grid order.
    """
    s = np.asarray(similarity, dtype=np.float64).ravel()
    positive = np.asarray(labels).ravel() > 0
    if s.size == 0 or s.size != positive.size:
        raise InvalidArgument(
            f"similarity {np.shape(similarity)} and labels {np.shape(labels)} must be equal "
            "and non-empty",
            field="labels",
        )
    span = (float(s.min()), float(s.max()) + 1e-12)
    classes = []
    for sign, members in ((-1.0, s[positive]), (1.0, s[~positive])):
        counts, _ = np.histogram(members, bins=_CALIBRATION_BINS, range=span)
        sums, _ = np.histogram(members, bins=_CALIBRATION_BINS, range=span, weights=members)
        used = counts > 0
        classes.append((sign, counts[used].astype(np.float64), sums[used] / counts[used]))
    a_values = torch.tensor(a_grid, dtype=torch.float64)
    b_values = torch.tensor(b_grid, dtype=torch.float64)

    def loss(b_index: torch.Tensor) -> torch.Tensor:
        """BCE sums (A, m) of every a with its m grid b's `b_index` (A, m)."""
        total = torch.zeros(b_index.shape, dtype=torch.float64)
        for sign, weight, mean in classes:
            # positives lose softplus(-z), negatives softplus(z), with z = a·(s + b)
            shifted = torch.from_numpy(mean) + b_values[b_index][..., None]
            z = sign * a_values[:, None, None] * shifted
            total += torch.nn.functional.softplus(z, threshold=50.0) @ torch.from_numpy(weight)
        return total

    low = torch.zeros(len(a_grid), dtype=torch.int64)
    high = torch.full((len(a_grid),), len(b_grid) - 1, dtype=torch.int64)
    while bool((low < high).any()):
        middle = (low + high) // 2
        pair = loss(torch.stack([middle, torch.clamp(middle + 1, max=len(b_grid) - 1)], dim=1))
        rising = pair[:, 1] >= pair[:, 0]
        searching = low < high
        high = torch.where(searching & rising, middle, high)
        low = torch.where(searching & ~rising, middle + 1, low)
    best = int(torch.argmin(loss(low[:, None])[:, 0]))
    return float(a_grid[best]), float(b_grid[int(low[best])])


def concept_filter(p: np.ndarray) -> np.ndarray:
    """(C,) bool: keep a concept whose 5 largest values average ≥ 0.5 and whose std is > 1e-5."""
    n_images = len(p)
    top = min(FILTER_TOP, n_images)
    keep = np.empty(p.shape[1], dtype=bool)
    step = max(1, (1 << 22) // max(n_images, 1))
    for c0 in range(0, p.shape[1], step):
        block = np.asarray(p[:, c0 : c0 + step], dtype=np.float64)
        largest = np.partition(block, n_images - top, axis=0)[n_images - top :]
        keep[c0 : c0 + step] = (largest.mean(axis=0) >= FILTER_MIN_TOP_MEAN) & (
            block.std(axis=0) > FILTER_MIN_STD
        )
    return keep


# --- split and moments ----------------------------------------------------------------


def split_images(n_images: int, seed: int) -> ImageSplit:
    """Seeded 70/10/20 train/val/test split of images [0, n_images), deterministic in (seed, N).

    Raises InvalidArgument when a part would hold fewer than 2 images.
    """
    n_train = round(SPLIT_FRACTIONS[0] * n_images)
    n_val = round(SPLIT_FRACTIONS[1] * n_images)
    if min(n_train, n_val, n_images - n_train - n_val) < 2:
        raise InvalidArgument(
            f"{n_images} images are too few for a 70/10/20 split with 2 images per part",
            field="n_images",
        )
    order = np.random.default_rng(seed).permutation(n_images)
    parts = np.split(order, [n_train, n_train + n_val])
    return ImageSplit(seed, *(np.sort(part).astype(np.int64) for part in parts))


def concept_moments(p: np.ndarray, split: ImageSplit) -> ConceptMoments:
    """Column means and covariances (÷ n) of (N, C) P on the train and on the val images."""
    train_mean, train_cov = _moments(p, split.train)
    val_mean, val_cov = _moments(p, split.val)
    return ConceptMoments(train_mean, train_cov, val_mean, val_cov)


def _moments(p: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.zeros(p.shape[1])
    for r0 in range(0, len(rows), _ROW_CHUNK):
        mean += np.asarray(p[rows[r0 : r0 + _ROW_CHUNK]], dtype=np.float64).sum(axis=0)
    mean /= len(rows)
    cov = np.zeros((p.shape[1], p.shape[1]))
    for r0 in range(0, len(rows), _ROW_CHUNK):
        centred = np.asarray(p[rows[r0 : r0 + _ROW_CHUNK]], dtype=np.float64) - mean
        cov += centred.T @ centred
    return mean, cov / len(rows)


def _cross(p: np.ndarray, rows: np.ndarray, y_centred: np.ndarray) -> np.ndarray:
    """(C, B) Σ_i P[i, c]·y_centred[i, u] / n over `rows` (y_centred is (n, B))."""
    out = np.zeros((p.shape[1], y_centred.shape[1]))
    for r0 in range(0, len(rows), _ROW_CHUNK):
        chunk = np.asarray(p[rows[r0 : r0 + _ROW_CHUNK]], dtype=np.float64)
        out += chunk.T @ y_centred[r0 : r0 + _ROW_CHUNK]
    return out / len(rows)


# --- fitting --------------------------------------------------------------------------


def fit_units(
    p: np.ndarray, activations: np.ndarray, split: ImageSplit, moments: ConceptMoments
) -> list[LinearExplanation]:
    """Linear explanations of the units of (N, B) pooled activations, over (N, C) P.

    Per unit: standardise P's columns and the unit on train, rank concepts by the signed
    elastic-net weight (α = 0.99, λ = 0.05/0.99), then select concepts greedily (see
    `greedy_selection`) with least squares on P's raw columns.
    """
    y = np.asarray(activations, dtype=np.float64)
    if y.ndim != 2 or len(y) != len(p):
        raise InvalidArgument(
            f"activations {y.shape} must be (N, units) over the {len(p)} images of P",
            field="activations",
        )
    y_train, y_val = y[split.train], y[split.val]
    train_y_mean = y_train.mean(axis=0)
    train_cross = _cross(p, split.train, y_train - train_y_mean)
    val_cross = _cross(p, split.val, y_val - y_val.mean(axis=0))
    weights = ranking_weights(moments.train_cov, train_cross, y_train.var(axis=0))
    # each unit's concepts by descending signed weight; equal weights keep concept order
    ranking = np.argsort(-weights.T, axis=1, kind="stable")
    chosen, fitted, correlations = greedy_selection(
        ranking, moments.train_cov, train_cross, moments.val_cov, val_cross, y_val.var(axis=0)
    )
    explanations = []
    for unit, (concepts, w) in enumerate(zip(chosen, fitted, strict=True)):
        order = np.argsort(-w, kind="stable")
        bias = train_y_mean[unit] - float(moments.train_mean[concepts] @ w)
        explanations.append(
            LinearExplanation(
                concepts=tuple(int(c) for c in concepts[order]),
                weights=tuple(float(v) for v in w[order]),
                bias=float(bias),
                val_correlation=float(correlations[unit]),
            )
        )
    return explanations


def ranking_weights(
    train_cov: np.ndarray, train_cross: np.ndarray, y_var: np.ndarray
) -> np.ndarray:
    """Elastic-net weights (C, B) of standardised concepts for standardised units.

    α = 0.99, λ = 0.05/0.99, fit from the train covariances: (C, C) `train_cov`, (C, B)
    `train_cross` and (B,) `y_var`. Constant columns and constant units get weight 0.
    """
    x_std = np.sqrt(np.diag(train_cov))
    x_scale = np.divide(1.0, x_std, out=np.zeros_like(x_std), where=x_std > 0)
    y_std = np.sqrt(y_var)
    y_scale = np.divide(1.0, y_std, out=np.zeros_like(y_std), where=y_std > 0)
    gram = train_cov * x_scale[:, None] * x_scale[None, :]
    cross = train_cross * x_scale[:, None] * y_scale[None, :]
    return elastic_net(gram, cross, LAMBDA * ALPHA, LAMBDA * (1 - ALPHA))


def elastic_net(
    gram: np.ndarray, cross: np.ndarray, l1: float, l2: float, tolerance: float = ENET_TOLERANCE
) -> np.ndarray:
    """Solve min_w ½wᵀGw − rᵀw + l1‖w‖₁ + (l2/2)‖w‖² for every column r of `cross`.

    With G = XᵀX/n and r = Xᵀy/n on centred X, y this is the elastic net
    (1/2n)‖y − Xw − b‖² + λ(α‖w‖₁ + (1−α)/2‖w‖²) with l1 = λα, l2 = λ(1−α) (and b = 0).
    (C, C) `gram`, (C, U) `cross` -> (C, U) float64 weights, for all units at once.

    Rounds of cyclic coordinate descent on an active set (glmnet's covariance updates),
    each followed by an exact solve of every unit's optimality conditions on its current
    support and signs (kept when it lowers that unit's largest violation), until no
    coordinate of any unit violates them by more than `tolerance` (or `_ROUNDS` rounds have
    run, a guard against a tolerance below rounding error). The exact solve is what makes
    strongly correlated concepts converge: coordinate descent alone crawls there.
    """
    gram = np.asarray(gram, dtype=np.float64)
    cross = np.asarray(cross, dtype=np.float64)
    weights = np.zeros((cross.shape[1], cross.shape[0]))  # (U, C): one unit per row
    residual = cross.T.copy()  # r − G·w per unit, (U, C)
    active = np.zeros(len(gram), dtype=bool)
    rough = 1e-3
    for _ in range(_ROUNDS):
        violation = _kkt_violation(weights, residual, l1, l2)
        if violation.max(initial=0.0) <= tolerance:
            break
        active |= (violation > tolerance).any(axis=0)
        _descend(weights, residual, gram, np.flatnonzero(active), l1, l2, rough)
        residual = cross.T - weights @ gram
        _solve_supports(weights, residual, gram, cross, l1, l2, tolerance)
        rough = max(tolerance, rough * 1e-2)
    return weights.T.copy()


def _descend(
    weights: np.ndarray,
    residual: np.ndarray,
    gram: np.ndarray,
    active: np.ndarray,
    l1: float,
    l2: float,
    tolerance: float,
) -> None:
    """Coordinate descent sweeps over the `active` coordinates, at most `_SWEEPS` of them.

    Stops early once no active coordinate violates the optimality conditions by more than
    `tolerance`. Updates `weights` and `residual` (both (U, C)) in place; only the active
    columns of `residual` are kept current.
    """
    w = np.ascontiguousarray(weights[:, active])
    r = np.ascontiguousarray(residual[:, active])
    g = gram[np.ix_(active, active)]
    diagonal = np.diag(g).copy()
    for _ in range(_SWEEPS):
        for j in range(len(active)):
            old = w[:, j].copy()
            z = r[:, j] + diagonal[j] * old
            new = np.sign(z) * np.maximum(np.abs(z) - l1, 0.0) / (diagonal[j] + l2)
            delta = new - old
            moved = np.flatnonzero(delta)
            if moved.size:
                w[:, j] = new
                r[moved] -= delta[moved, None] * g[j]
        if _kkt_violation(w, r, l1, l2).max(initial=0.0) <= tolerance:
            break
    weights[:, active] = w
    residual[:, active] = r


def _solve_supports(
    weights: np.ndarray,
    residual: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    l1: float,
    l2: float,
    tolerance: float,
) -> None:
    """For each unit not yet optimal, solve (G_SS + l2·I)·w_S = r_S − l1·sign(w_S) on its support S.

    A unit takes the solution (in `weights` and `residual`, in place) when it keeps the signs
    and lowers the unit's largest optimality violation.
    """
    worst = _kkt_violation(weights, residual, l1, l2).max(axis=1, initial=0.0)
    units = [u for u in np.flatnonzero(worst > tolerance) if weights[u].any()]
    if not units:
        return
    proposal = np.zeros((len(units), weights.shape[1]))
    for row, unit in enumerate(units):
        support = np.flatnonzero(weights[unit])
        signs = np.sign(weights[unit, support])
        system = gram[np.ix_(support, support)] + l2 * np.eye(len(support))
        solved = np.linalg.solve(system, cross[support, unit] - l1 * signs)
        if np.array_equal(np.sign(solved), signs):
            proposal[row, support] = solved
    proposed_residual = cross.T[units] - proposal @ gram
    better = _kkt_violation(proposal, proposed_residual, l1, l2).max(axis=1) < worst[units]
    better &= proposal.any(axis=1)
    taken = np.asarray(units)[better]
    weights[taken] = proposal[better]
    residual[taken] = proposed_residual[better]


def _kkt_violation(weights: np.ndarray, residual: np.ndarray, l1: float, l2: float) -> np.ndarray:
    """How far each (unit, coordinate) is from optimal: |r − l2·w − l1·sign(w)| or (|r| − l1)₊."""
    nonzero = np.abs(residual - l2 * weights - l1 * np.sign(weights))
    return np.where(weights != 0, nonzero, np.maximum(np.abs(residual) - l1, 0.0))


def greedy_selection(
    ranking: np.ndarray,
    train_cov: np.ndarray,
    train_cross: np.ndarray,
    val_cov: np.ndarray,
    val_cross: np.ndarray,
    val_y_var: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Greedy concept selection for every unit at once, from covariances only.

    `ranking` (B, C) is each unit's concept order; (C, C) covariances and (C, B) concept-unit
    cross-covariances on train and val, (B,) unit variance on val. A step fits least squares
    (with intercept) on the raw columns of the selected concepts plus one candidate on train
    and scores it by Pearson ρ on val. Candidates are the next `CANDIDATES` concepts in rank
    order that are neither selected nor rejected. The first step takes the candidate with the
    largest ρ > 0; later steps reject for good every candidate with ρ − ρ_best < `MIN_GAIN`
    and take the best of the rest. A unit stops when a step has nothing to take or at
    `MAX_CONCEPTS` concepts.

    Returns per unit the selected concepts (in selection order) and their least-squares
    weights, and (B,) the val ρ of the final selection (0.0 for none).
    """
    n_units, n_concepts = ranking.shape
    width = min(CANDIDATES, n_concepts)
    chosen = np.zeros((n_units, MAX_CONCEPTS), dtype=np.int64)
    weights: list[np.ndarray] = [np.zeros(0) for _ in range(n_units)]
    best = np.zeros(n_units)
    blocked = np.zeros((n_units, n_concepts), dtype=bool)  # selected or rejected
    live = np.arange(n_units)
    for step in range(MAX_CONCEPTS):
        if not live.size or not width:
            break
        available = ~np.take_along_axis(blocked[live], ranking[live], axis=1)
        rank = np.cumsum(available, axis=1)
        valid = np.zeros((len(live), width), dtype=bool)
        candidates = np.zeros((len(live), width), dtype=np.int64)
        slot, position = np.nonzero(available & (rank <= width))
        column = rank[slot, position] - 1
        valid[slot, column] = True
        candidates[slot, column] = ranking[live[slot], position]
        sets = np.concatenate(
            [np.repeat(chosen[live, None, :step], width, axis=1), candidates[:, :, None]], axis=2
        )
        fitted, rho = _fit_sets(
            sets, live, train_cov, train_cross, val_cov, val_cross, val_y_var[live]
        )
        if step == 0:
            eligible = valid & (rho > 0)
        else:
            rejected = valid & (rho - best[live, None] < MIN_GAIN)
            blocked[live[:, None].repeat(width, axis=1)[rejected], candidates[rejected]] = True
            eligible = valid & ~rejected
        takes = eligible.any(axis=1)
        pick = np.argmax(np.where(eligible, rho, -np.inf), axis=1)
        rows = np.flatnonzero(takes)
        units = live[rows]
        taken = candidates[rows, pick[rows]]
        chosen[units, step] = taken
        blocked[units, taken] = True
        best[units] = rho[rows, pick[rows]]
        for row, unit in zip(rows, units, strict=True):
            weights[unit] = fitted[row, pick[row]]
        live = units
    counts = [len(w) for w in weights]
    return [chosen[u, : counts[u]] for u in range(n_units)], weights, best


def _fit_sets(
    sets: np.ndarray,
    units: np.ndarray,
    train_cov: np.ndarray,
    train_cross: np.ndarray,
    val_cov: np.ndarray,
    val_cross: np.ndarray,
    val_y_var: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares on train and val ρ for concept sets (L, W, s) of units (L,).

    Returns weights (L, W, s) and ρ (L, W). The minimum-norm solution is used when columns
    are collinear; a prediction constant on val (or a constant unit) has ρ = 0.
    """
    owner = units[:, None, None]
    sigma = train_cov[sets[..., :, None], sets[..., None, :]]
    fitted = np.einsum(
        "lwij,lwj->lwi", np.linalg.pinv(sigma, rtol=1e-10, hermitian=True), train_cross[sets, owner]
    )
    covariance = np.einsum("lwi,lwi->lw", fitted, val_cross[sets, owner])
    val_sigma = val_cov[sets[..., :, None], sets[..., None, :]]
    variance = np.einsum("lwi,lwij,lwj->lw", fitted, val_sigma, fitted)
    scale = np.einsum("lwi,lwi->lw", fitted**2, np.diagonal(val_sigma, axis1=2, axis2=3))
    usable = (variance > 1e-12 * scale) & (val_y_var[:, None] > 0)
    denominator = np.sqrt(np.where(usable, variance * val_y_var[:, None], 1.0))
    rho = np.where(usable, covariance / denominator, 0.0)
    return fitted, np.clip(rho, -1.0, 1.0)
