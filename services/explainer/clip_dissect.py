"""CLIP-Dissect: name each unit by the open-vocabulary concept its top images match best.

Spec: specs/clip_dissect.md (Oikarinen & Weng, ICLR 2023). Who runs what:

1. once per job: the extractor embeds the concept set and the probe images with CLIP
   (`services/extractor/text_embeddings.py`, `clip_models.py`); `clip_similarity` of the
   stored embeddings gives S (N images, C concepts);
2. once per layer: `prepare_concepts(method, S)`, the (N, C) matrix every unit block reads
   (P̃ = softmax over concepts of a·S for the WPMI functions, which may be written over S;
   normalised columns for the cosine ones);
3. once per unit block [u0, u1) (one Ray task): `unit_rows(method, A[:, u0:u1], prepared)`,
   the block's (u1 - u0, C) rows: L[k, m] for (soft-)WPMI, final similarities otherwise;
4. once per layer: `layer_similarity(method, rows)` on the rows of every block stacked in
   unit order. The WPMI marginal log p̄(m) is taken there, over the whole layer, so labels
   never depend on the block size;
5. `describe_units` (label = argmax, score = max, top 5), ordered by `layer_ranking`.

Memory stays bounded by a block or a chunk, never by N, beyond S itself and the (U, C)
rows: `prepare_concepts` takes the softmax in cache-sized row chunks and, with
`overwrite`, writes P̃ over S (so each image's softmax row is computed once per layer,
not once per unit that ranks it in its top κ); `unit_rows` gathers only the P̃ rows of a
few units' top images at a time. Factor j, (1 - p_j) + p_j·P̃ + min_prob, is written
p_j·(d_j + P̃), so a factor costs one addition and Σ_j log p_j is one constant per row;
Σ_j log(·) is a sum of logs of products of 11 to 20 consecutive factors (`_factor_groups`
keeps every product within e^±80, far from float32 underflow), which is exact up to
float32 rounding and needs a sixteenth of the logarithms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.spec_vocabulary import SIMILARITIES

TOP_CONCEPTS = 5

# Floats of one chunk of rows for top_indices (64 MiB).
_PASS_ELEMENTS = 1 << 24
# Floats per working buffer of one step (4 MiB), small enough to stay in cache.
_STEP_ELEMENTS = 1 << 20
# Floats of one column chunk of the marginal (1 MiB).
_MARGINAL_ELEMENTS = 1 << 18
# Rows per block of a transposing copy (a cache-friendly transpose).
_TRANSPOSE_ROWS = 256
# Row stride (floats) of buffers that exp2 or log run over: a multiple of any SIMD width.
_ROW_PAD = 64
# A product of factors is kept above exp(-80), well inside float32 (smallest normal ~ e^-87.3).
_LOG_PRODUCT_FLOOR = 80.0
# soft-WPMI similarity this close to its bound log U ranks a unit's concepts by log-odds.
_SATURATION = 1e-3
# Cosine similarity: columns with a smaller norm than this are treated as zero.
_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class WpmiParams:
    """Parameters of a (soft-)WPMI similarity function.

    Unit k's score of concept m is L[k, m] = Σ_{j<κ} log((1 - p_j) + p_j·P̃[x_kj, m] + min_prob)
    with P̃ = softmax over concepts of a·S, x_k0.. the κ top images of unit k (largest
    activation first) and p_j = p_start - (j/κ)(p_start - p_end). Plain WPMI is p_j = 1.
    When the probe set has fewer than κ images, κ is the number of images.
    """

    top_k: int
    a: float
    lam: float
    p_start: float
    p_end: float
    min_prob: float = 1e-7

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InvalidArgument(f"must be at least 1, got {self.top_k}", field="top_k")
        if not 0.0 < self.p_end <= 1.0 or not 0.0 < self.p_start <= 1.0:
            raise InvalidArgument(
                f"p_start and p_end must lie in (0, 1], got {self.p_start}, {self.p_end}",
                field="p_start",
            )
        if self.min_prob <= 0.0:
            raise InvalidArgument(f"must be positive, got {self.min_prob}", field="min_prob")

    def factor_offsets(self, k: int) -> tuple[np.ndarray, float]:
        """(d, Σ_j log p_j) for κ = k, d (k,) float32 with d_j = (1 - p_j + min_prob) / p_j.

        Factor j is p_j·(d_j + P̃), so L[k, m] = Σ_j log(d_j + P̃[x_kj, m]) + Σ_j log p_j:
        one addition per factor, the p_j folded into a constant per row.
        """
        p = self.p_start - np.arange(k) / k * (self.p_start - self.p_end)
        return ((1.0 - p + self.min_prob) / p).astype(np.float32), float(np.log(p).sum())


SOFT_WPMI = WpmiParams(top_k=100, a=10.0, lam=1.0, p_start=0.998, p_end=0.97)
WPMI = WpmiParams(top_k=28, a=2.0, lam=0.6, p_start=1.0, p_end=1.0)
_WPMI_PARAMS = {"soft_wpmi": SOFT_WPMI, "wpmi": WPMI}
# The similarity functions scored from each unit's top images (`wpmi_rows`, `TopImages`).
WPMI_SIMILARITIES = tuple(_WPMI_PARAMS)


@dataclass(frozen=True)
class UnitDescription:
    """CLIP-Dissect's answer for one unit: the best concept and the runners-up."""

    unit: int
    label: str
    score: float
    top_labels: tuple[str, ...]
    top_scores: tuple[float, ...]


def _unit_rows_l2(x: np.ndarray) -> np.ndarray:
    """Rows of `x` (R, D) scaled to unit L2 norm, as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _TINY)


def clip_similarity(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """S[i, m] = v̂_i · t̂_m, the cosine of image i and concept m, with no logit scale.

    (N, D) and (C, D) embeddings (normalised again here) -> (N, C) float32.
    """
    return _unit_rows_l2(image_embeddings) @ _unit_rows_l2(text_embeddings).T


def check_method(method: str) -> str:
    """Return `method` if it names a similarity function, else raise InvalidArgument."""
    if method not in SIMILARITIES:
        raise InvalidArgument(
            f"unknown similarity function {method!r}; allowed: {', '.join(SIMILARITIES)}",
            field="similarity_function",
        )
    return method


def prepare_concepts(method: str, similarity: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Turn S (N, C) into the (N, C) float32 matrix that `unit_rows` reads, once per layer.

    soft_wpmi, wpmi: P̃ = softmax over concepts of a·S, row by row (a of the method).
    cos: columns of S divided by their L2 norm over images. cos_cubed: columns centred,
    cubed, then divided by max(L2 norm, 1e-3).

    With `overwrite`, the WPMI functions may write P̃ into `similarity` itself (when it is a
    writable C-contiguous float32 array), which then holds P̃, not S; this keeps a second
    (N, C) array out of memory when the caller has no further use for S.
    """
    check_method(method)
    if method == "cos":
        return _columns_l2(np.asarray(similarity, dtype=np.float32))
    if method == "cos_cubed":
        return _columns_cubed(np.asarray(similarity, dtype=np.float32))
    return _softmax_rows(similarity, _WPMI_PARAMS[method].a, overwrite)


def unit_rows(method: str, activations: np.ndarray, prepared: np.ndarray) -> np.ndarray:
    """Step 1, one unit block: (N, B) activations of units [u0, u1) -> (B, C) float32 rows.

    `prepared` is `prepare_concepts(method, S)`. For soft_wpmi and wpmi the rows are
    L[k, m] (see `WpmiParams`), to be finished by `layer_similarity` together with every
    other block of the layer; for cos and cos_cubed they are the final similarities.
    A row depends only on its own unit's activations, never on the other units of the block.
    """
    check_method(method)
    activations = np.asarray(activations)
    if activations.ndim != 2 or prepared.ndim != 2 or len(activations) != len(prepared):
        raise InvalidArgument(
            f"activations {activations.shape} and concept matrix {prepared.shape} must be "
            "(N, units) and (N, concepts) over the same images",
            field="activations",
        )
    params = _WPMI_PARAMS.get(method)
    # a block is often a column slice of the layer's (N, U) array: copy it compactly once,
    # as (units, N) rows for the WPMI functions, which select each unit's top images
    compact = _transposed(activations) if params else np.ascontiguousarray(activations, np.float32)
    if not np.isfinite(compact).all():
        raise InvalidArgument("activations hold NaN or infinite values", field="activations")
    if params:
        return _wpmi_rows(compact, np.asarray(prepared, dtype=np.float32), params)
    if method == "cos":
        return _columns_l2(compact).T @ prepared
    return _columns_cubed(compact).T @ prepared


def layer_similarity(method: str, rows: np.ndarray) -> np.ndarray:
    """Step 2, once per layer: (U, C) rows of all blocks in unit order -> (U, C) similarity.

    For soft_wpmi and wpmi: sim[k, m] = L[k, m] - λ·log p̄(m) with
    log p̄(m) = logsumexp_k L[k, m] - log U over all U units of the layer.
    For cos and cos_cubed the rows are returned unchanged.
    """
    check_method(method)
    rows = np.asarray(rows, dtype=np.float32)
    params = _WPMI_PARAMS.get(method)
    if params is None:
        return rows
    return rows - (params.lam * _log_marginal(rows)).astype(np.float32)


def layer_ranking(method: str, rows: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """(U, C) keys that order each unit's concepts as its exact similarity does.

    `rows` are the layer's L rows, `similarity` is `layer_similarity(method, rows)`.
    soft_wpmi (λ = 1): sim[k, m] = log U - log(1 + exp(-r[k, m])) with
    r[k, m] = L[k, m] - logsumexp_{k' ≠ k} L[k', m], the log-odds of unit k against the
    rest of the layer. sim is increasing in r, but in float32 it saturates at log U for
    every concept with r above about 16 (a concept far likelier on this unit's top images
    than on any other unit's, common in small layers). A unit whose best sim is within
    `_SATURATION` of log U is ranked by r; the others, and the other functions, by sim:
    `similarity` itself is returned when no unit is saturated.
    """
    params = _WPMI_PARAMS.get(check_method(method))
    n_units = len(rows)
    if params is None or params.lam != 1.0 or n_units < 2:
        return similarity
    saturated = np.flatnonzero(similarity.max(axis=1) >= math.log(n_units) - _SATURATION)
    if not len(saturated):
        return similarity
    rank = similarity.copy()
    step = max(1, _MARGINAL_ELEMENTS // n_units)
    for c0 in range(0, rows.shape[1], step):
        block = np.asarray(rows[:, c0 : c0 + step], dtype=np.float64)
        rank[saturated, c0 : c0 + step] = (block - _leave_one_out_logsumexp(block))[saturated]
    return rank


def _leave_one_out_logsumexp(x: np.ndarray) -> np.ndarray:
    """(K, M) -> (K, M): log Σ_{k' ≠ k} exp(x[k', m]), K ≥ 2, with no cancellation.

    With x₁ the column maximum (at row t) and x₂ the maximum of the others:
    row t gets x₂ + log Σ_{k' ≠ t} exp(x[k'] - x₂); any other row k gets
    x₁ + log(1 + Σ_{k' ≠ t} exp(x[k'] - x₁) - exp(x[k] - x₁)), whose argument is ≥ 1.
    """
    columns = np.arange(x.shape[1])
    top = x.argmax(axis=0)
    first = x[top, columns]
    others = x.copy()
    others[top, columns] = -np.inf
    second = others.max(axis=0)
    rest = np.exp(others - second).sum(axis=0)  # ≥ 1: the second maximum's own term
    own = np.exp(x - first)
    own[top, columns] = 0.0  # row t is set below; its generic value would be log(0)
    out = first + np.log1p(np.exp(second - first) * rest - own)
    out[top, columns] = second + np.log(rest)
    return out


def describe_units(
    similarity: np.ndarray,
    concepts: Sequence[str],
    first_unit: int = 0,
    top: int = TOP_CONCEPTS,
    rank: np.ndarray | None = None,
) -> list[UnitDescription]:
    """Label, score and top concepts of every unit from its (U, C) similarity row.

    label = argmax_m sim[k, m], score = max_m sim[k, m]; unit numbers start at
    `first_unit`. Concepts are ordered by `rank` (U, C) when given (`layer_ranking`,
    the same order as sim's without float32 saturation), else by sim; ties go to the
    earlier concept.
    """
    if similarity.shape[1] != len(concepts):
        raise InvalidArgument(
            f"{similarity.shape[1]} similarity columns for {len(concepts)} concepts",
            field="concepts",
        )
    best = top_indices(similarity if rank is None else rank, min(top, len(concepts)))
    scores = np.take_along_axis(similarity, best, axis=1)
    return [
        UnitDescription(
            unit=first_unit + k,
            label=concepts[best[k, 0]],
            score=float(scores[k, 0]),
            top_labels=tuple(concepts[m] for m in best[k]),
            top_scores=tuple(float(s) for s in scores[k]),
        )
        for k in range(len(best))
    ]


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row of (R, M) `values`: (R, k) int64.

    Largest first; ties go to the lower index, so the choice never depends on anything but
    the row itself (and survives any strictly increasing transform of it).
    """
    n_rows, size = values.shape
    out = np.empty((n_rows, k), dtype=np.int64)
    step = max(1, _PASS_ELEMENTS // size)
    for r0 in range(0, n_rows, step):
        rows = np.ascontiguousarray(values[r0 : r0 + step])
        chunk = torch.from_numpy(rows)
        found_values, found = torch.topk(chunk, k, dim=1)
        kth = found_values[:, -1:].numpy()
        # where a value equal to the k-th was left out, torch chose among ties: redo those rows
        left_out = np.count_nonzero(rows == kth, axis=1) > np.count_nonzero(
            found_values.numpy() == kth, axis=1
        )
        for row in np.flatnonzero(left_out):
            found[row] = torch.from_numpy(_top_set_lowest_ties(rows[row], k))
        found = torch.sort(found, dim=1).values
        order = torch.argsort(-torch.gather(chunk, 1, found), dim=1, stable=True)
        out[r0 : r0 + len(rows)] = torch.gather(found, 1, order).numpy()
    return out


def _top_set_lowest_ties(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of (M,) `values` as a sorted index set (k,), ties to lower indices."""
    kth = np.partition(values, len(values) - k)[len(values) - k]
    above = values > kth
    tied = values == kth
    return np.flatnonzero(above | (tied & (np.cumsum(tied) <= k - np.count_nonzero(above))))


def _softmax_rows(similarity: np.ndarray, a: float, overwrite: bool) -> np.ndarray:
    """P̃ = softmax over concepts of a·S for each row of (N, C) S: (N, C) float32.

    Works in cache-sized row chunks, so it needs no memory beyond its output, which is
    `similarity` itself when `overwrite` is set and it is a writable C-contiguous float32
    array. A row depends only on itself, never on the chunk it falls in (`_padded_rows`).
    """
    source = np.asarray(similarity)
    if source.ndim != 2:
        raise InvalidArgument(f"S must be (N, concepts), got {source.shape}", field="similarity")
    in_place = (
        overwrite
        and source.dtype == np.float32
        and source.flags.c_contiguous
        and source.flags.writeable
    )
    out = source if in_place else np.empty(source.shape, dtype=np.float32)
    n_images, n_concepts = out.shape
    if out.size == 0:
        return out
    # exp2 of a rescaled argument, which torch computes about twice as fast as exp on CPU
    scale = a / math.log(2.0)
    step = max(1, _STEP_ELEMENTS // n_concepts)
    scratch = _padded_rows(step, n_concepts)
    for r0 in range(0, n_images, step):
        rows = _tensor(np.ascontiguousarray(source[r0 : r0 + step], dtype=np.float32))
        logits = scratch[: len(rows)]
        # scale·S - scale·max S in one pass: the row's largest logit becomes 0, none overflows
        shift = rows.amax(dim=1, keepdim=True).mul_(-scale)
        torch.add(shift, rows, alpha=scale, out=logits)
        logits.exp2_()
        # a reduction over rows only: torch sums each row alone, whatever the thread count
        torch.div(
            logits, logits.sum(dim=1, keepdim=True), out=torch.from_numpy(out[r0 : r0 + step])
        )
    return out


def _padded_rows(n_rows: int, n_columns: int) -> torch.Tensor:
    """An uninitialised (n_rows, n_columns) float32 view whose rows lie `_ROW_PAD` floats apart.

    torch runs a transcendental function (exp2, log) on a contiguous tensor as one flat
    array: SIMD code, then scalar code, of another rounding, on the last few elements. On
    rows a whole number of SIMD widths apart it runs row by row, so an element's value never
    depends on how many rows share the tensor or where its row falls.
    """
    stride = -(-n_columns // _ROW_PAD) * _ROW_PAD
    flat = torch.from_numpy(np.empty(n_rows * stride, np.float32))
    return flat.view(n_rows, stride)[:, :n_columns]


def _wpmi_rows(by_unit: np.ndarray, probs: np.ndarray, params: WpmiParams) -> np.ndarray:
    """L[k, m] for the units of (B, N) activations `by_unit` against (N, C) float32 P̃: (B, C)."""
    return _wpmi_rows_of_top(top_indices(by_unit, min(params.top_k, by_unit.shape[1])), probs,
                             params)


def wpmi_rows(method: str, top: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """L[k, m] of (soft-)WPMI from each unit's top images: (U, κ) int64 and (N, c) P̃ -> (U, c).

    `top` as `TopImages.indices()` gives it, `probs` any columns of P̃ over all N images
    (`prepare_concepts`). Each column of L depends only on that column of P̃, so the
    layer's rows can be computed concept block by concept block; within a column the
    arithmetic is `unit_rows`' own, so blocks whose starts are multiples of 64 concepts
    give `unit_rows`' values bit for bit (`_padded_rows`).
    """
    params = _WPMI_PARAMS[check_method(method)]
    return _wpmi_rows_of_top(top, np.asarray(probs, dtype=np.float32), params)


class TopImages:
    """Each unit's κ top images over image chunks streamed in order: `top_indices`' answer.

    Memory is (U, κ) plus one chunk, whatever the number of images. Ties go to the
    lower image index, as `top_indices` over all images at once has them.
    """

    def __init__(self, method: str) -> None:
        self.top_k = _WPMI_PARAMS[check_method(method)].top_k
        self._values = np.zeros((0, 0), dtype=np.float32)  # (U, k') best first
        self._indices = np.zeros((0, 0), dtype=np.int64)
        self._n_images = 0

    def add(self, activations: np.ndarray) -> None:
        """The next chunk of images: (n, U) activations (pooled), in image order."""
        chunk = _transposed(np.asarray(activations))
        if not np.isfinite(chunk).all():
            raise InvalidArgument("activations hold NaN or infinite values", field="activations")
        images = np.arange(self._n_images, self._n_images + chunk.shape[1])
        if self._n_images:
            chunk = np.concatenate([self._values, chunk], axis=1)
            images = np.concatenate(
                [self._indices, np.broadcast_to(images, (len(chunk), len(images)))], axis=1
            )
        else:
            images = np.broadcast_to(images, chunk.shape)
        # the kept images come first and have the lower indices: ties keep them
        best = top_indices(chunk, min(self.top_k, chunk.shape[1]))
        self._values = np.take_along_axis(chunk, best, axis=1)
        self._indices = np.take_along_axis(images, best, axis=1)
        self._n_images += len(activations)

    def indices(self) -> np.ndarray:
        """(U, min(κ, N)) int64 each unit's top images, largest activation first."""
        return self._indices


def _wpmi_rows_of_top(top: np.ndarray, probs: np.ndarray, params: WpmiParams) -> np.ndarray:
    """L[k, m] for units with (B, κ) top images `top` against (N, C) float32 P̃: (B, C).

    A few units at a time (`_STEP_ELEMENTS` floats of factors), it gathers the P̃ rows of a
    group of their top images, adds d_j (see `WpmiParams.factor_offsets`), multiplies the
    group's factors (`_factor_groups`) and adds the log of the product. A unit's row comes
    out bit for bit the same, whatever block or step it falls in (`_padded_rows`).
    """
    n_units, k = top.shape
    n_concepts = probs.shape[1]
    offsets, log_p = params.factor_offsets(k)
    d_col = torch.from_numpy(offsets)[:, None]
    groups = _factor_groups(offsets)
    widest = max(j1 - j0 for j0, j1 in groups)
    per_step = max(1, _STEP_ELEMENTS // (widest * n_concepts))
    # buffers are reused, and large ones come from numpy, which asks Linux for huge pages:
    # fresh memory costs a page fault per page touched, 4 KiB pages being slow to fault in
    factors_buffer = torch.from_numpy(np.empty(per_step * widest * n_concepts, np.float32))
    product_buffer = _padded_rows(per_step, n_concepts)
    rows = torch.from_numpy(np.empty((n_units, n_concepts), np.float32))
    for v0 in range(0, n_units, per_step):
        b = min(per_step, n_units - v0)
        acc = rows[v0 : v0 + b]
        product = product_buffer[:b]
        for j0, j1 in groups:
            factors = factors_buffer[: b * (j1 - j0) * n_concepts].view(b, j1 - j0, n_concepts)
            # mode="clip" (indices are valid anyway) lets numpy write into `factors` directly
            np.take(
                probs,
                top[v0 : v0 + b, j0:j1].ravel(),
                axis=0,
                out=factors.numpy().reshape(-1, n_concepts),
                mode="clip",
            )
            factors.add_(d_col[j0:j1])
            torch.prod(factors, dim=1, out=product)
            if j0 == 0:
                torch.log(product, out=acc)
            else:
                acc.add_(product.log_())
        acc.add_(log_p)
    return rows.numpy()


def _factor_groups(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Cut positions 0..κ-1 into ranges [j0, j1) whose factors d_j + P̃ multiply safely.

    P̃ lies in [0, 1], so a range's product lies in [Π d_j, Π (1 + d_j)]; each range is made
    as long as keeps that interval within e^±80, well inside float32 (smallest normal
    ~ e^-87.3), so the product loses nothing to underflow or overflow.
    """
    low = -np.log(offsets.astype(np.float64))
    high = np.log1p(offsets.astype(np.float64))
    groups = []
    j0 = 0
    while j0 < len(offsets):
        j1 = j0 + 1
        while (
            j1 < len(offsets)
            and low[j0 : j1 + 1].sum() <= _LOG_PRODUCT_FLOOR
            and high[j0 : j1 + 1].sum() <= _LOG_PRODUCT_FLOOR
        ):
            j1 += 1
        groups.append((j0, j1))
        j0 = j1
    return groups


def _transposed(x: np.ndarray) -> np.ndarray:
    """(N, B) `x` as a C-contiguous (B, N) float32 array, copied in cache-sized row chunks."""
    out = np.empty((x.shape[1], x.shape[0]), dtype=np.float32)
    for r0 in range(0, len(x), _TRANSPOSE_ROWS):
        out[:, r0 : r0 + _TRANSPOSE_ROWS] = np.ascontiguousarray(
            x[r0 : r0 + _TRANSPOSE_ROWS], dtype=np.float32
        ).T
    return out


def _tensor(x: np.ndarray) -> torch.Tensor:
    """A torch view of `x`, or of a copy where `x` is read-only (torch wants writable memory)."""
    return torch.from_numpy(x if x.flags.writeable else np.array(x))


def _log_marginal(rows: np.ndarray) -> np.ndarray:
    """Log p̄(m) = logsumexp_k L[k, m] - log K of (K, C) rows: (C,) float64.

    Column chunks in cache: exp(L - max) in float32 (each term to about 1e-7), summed in
    float64, so log p̄ is good to about 1e-7, far below a float32 ulp of L.
    """
    n_units, n_concepts = rows.shape
    out = np.empty(n_concepts, dtype=np.float64)
    step = max(1, _MARGINAL_ELEMENTS // max(n_units, 1))
    buffer = torch.empty(n_units * min(step, n_concepts))
    for c0 in range(0, n_concepts, step):
        block = _tensor(rows[:, c0 : c0 + step])
        width = block.shape[1]
        top = block.amax(dim=0)
        terms = buffer[: n_units * width].view(n_units, width)
        torch.sub(block, top, out=terms).exp_()
        total = terms.sum(dim=0, dtype=torch.float64)
        out[c0 : c0 + width] = (top.double() + total.log_()).numpy()
    return out - math.log(n_units)


def _columns_l2(x: np.ndarray) -> np.ndarray:
    """Columns of (N, M) `x` divided by their L2 norm (zero columns stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), _TINY)


def _columns_cubed(x: np.ndarray, min_norm: float = 1e-3) -> np.ndarray:
    """Columns of (N, M) `x` centred, cubed and divided by max(L2 norm, `min_norm`).

    The column means are accumulated in float64: a float32 mean of thousands of
    images is off by ~1e-5, which the cube carries into the output.
    """
    mean = x.mean(axis=0, keepdims=True, dtype=np.float64).astype(x.dtype)
    cubed = (x - mean) ** 3
    return cubed / np.maximum(np.linalg.norm(cubed, axis=0, keepdims=True), min_norm)
