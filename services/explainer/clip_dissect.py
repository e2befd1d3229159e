"""CLIP-Dissect: name each unit by the open-vocabulary concept its top images match best.

Spec: specs/clip_dissect.md (Oikarinen & Weng, ICLR 2023). Who runs what:

1. once per job: `load_concepts` (the concept file), `encode_concepts` and `encode_images`
   (with an open_clip model the caller built from a local checkpoint) and `clip_similarity`,
   giving S (N images, C concepts);
2. once per layer: `prepare_concepts(method, S)`, the (N, C) matrix every unit block reads
   (S itself for the WPMI functions; normalised columns for the cosine ones);
3. once per unit block [u0, u1) (one Ray task): `unit_rows(method, A[:, u0:u1], prepared)`,
   the block's (u1 - u0, C) rows: L[k, m] for (soft-)WPMI, final similarities otherwise;
4. once per layer: `layer_similarity(method, rows)` on the rows of every block stacked in
   unit order. The WPMI marginal log p̄(m) is taken there, over the whole layer, so labels
   never depend on the block size;
5. `describe_units` (label = argmax, score = max, top 5) and `descriptions_csv`.

Memory of `unit_rows` for (soft-)WPMI is bounded by its block, never by N: only the κ
top images of each unit enter L, so it gathers S rows for a few units' top images at a
time, takes their softmax over concepts in row chunks, and never builds the dense
(N, C) softmax. Σ_j log(·) is evaluated as a sum of logs of products of up to a dozen
factors (a factor lies between min_prob and 1 + min_prob, and the group size keeps their
product above e^-80, far from float32 underflow), which is exact up to float32 rounding
and needs a tenth of the logarithms.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from services.common.errors import InvalidArgument

METHODS = ("soft_wpmi", "wpmi", "cos", "cos_cubed")
DEFAULT_METHOD = "soft_wpmi"
TOP_CONCEPTS = 5
CSV_HEADER = ("layer", "unit", "description", "similarity")

# Floats of P̃ rows held for one pass of units (64 MiB).
_PASS_ELEMENTS = 1 << 24
# A pass computes each distinct image's softmax row once when its units' top images hold
# at most this fraction of distinct ones; above it, gathering would cost more than it saves.
_SHARED_BELOW = 0.5
# Floats per working buffer of one step (4 MiB), small enough to stay in cache.
_STEP_ELEMENTS = 1 << 20
# A product of factors is kept above exp(-80), well inside float32 (smallest normal ~ e^-87.3).
_LOG_PRODUCT_FLOOR = 80.0
# Cosine similarity: columns with a smaller norm than this are treated as zero.
_TINY = float(np.finfo(np.float32).tiny)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class ClipModel(Protocol):
    """What this module uses of an open_clip model (`open_clip.CLIP` satisfies it)."""

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, D) text features."""
        ...

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, D) image features."""
        ...


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

    def position_weights(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(p, c), (k,) float32 each: factor j is c_j + p_j·P̃ with c_j = 1 - p_j + min_prob."""
        p = self.p_start - np.arange(k) / k * (self.p_start - self.p_end)
        return p.astype(np.float32), (1.0 - p + self.min_prob).astype(np.float32)


SOFT_WPMI = WpmiParams(top_k=100, a=10.0, lam=1.0, p_start=0.998, p_end=0.97)
WPMI = WpmiParams(top_k=28, a=2.0, lam=0.6, p_start=1.0, p_end=1.0)
_WPMI_PARAMS = {"soft_wpmi": SOFT_WPMI, "wpmi": WPMI}


@dataclass(frozen=True)
class UnitDescription:
    """CLIP-Dissect's answer for one unit: the best concept and the runners-up."""

    unit: int
    label: str
    score: float
    top_labels: tuple[str, ...]
    top_scores: tuple[float, ...]


def load_concepts(data: bytes | str) -> list[str]:
    """Parse a concept set: one concept per line (LF, CRLF or CR), stripped, empty lines dropped.

    Bytes must be UTF-8 (a leading byte-order mark is ignored). Raises InvalidArgument
    (field `concept_set`) for undecodable bytes or a set with no concept.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"not UTF-8 text: {exc}", field="concept_set") from None
    else:
        text = data.removeprefix("\ufeff")
    concepts = [line.strip() for line in _LINE_BREAK.split(text)]
    concepts = [concept for concept in concepts if concept]
    if not concepts:
        raise InvalidArgument("the concept set holds no concept", field="concept_set")
    return concepts


def encode_concepts(
    model: ClipModel,
    tokenizer: Callable[[list[str]], torch.Tensor],
    concepts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embed concepts with the CLIP text encoder, raw strings with no prompt template.

    `model` (in eval mode, on `device`) and `tokenizer` come from open_clip. Returns
    (C, D) float32 rows of unit L2 norm.
    """
    parts = []
    with torch.inference_mode():
        for start in range(0, len(concepts), batch_size):
            tokens = tokenizer(list(concepts[start : start + batch_size])).to(device)
            parts.append(_unit_rows_l2(model.encode_text(tokens).float().cpu().numpy()))
    if not parts:
        raise InvalidArgument("no concept to embed", field="concept_set")
    return np.concatenate(parts)


def encode_images(
    model: ClipModel,
    preprocess: Callable[[Any], torch.Tensor],
    images: Iterable[Any],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embed images (e.g. PIL images) with CLIP's own preprocessing and image encoder.

    `model` (in eval mode, on `device`) and `preprocess` come from open_clip. Images are
    consumed in batches of `batch_size`. Returns (N, D) float32 rows of unit L2 norm.
    """
    parts = []
    batch: list[torch.Tensor] = []
    with torch.inference_mode():
        for image in images:
            batch.append(preprocess(image))
            if len(batch) == batch_size:
                parts.append(_encode_image_batch(model, batch, device))
                batch = []
        if batch:
            parts.append(_encode_image_batch(model, batch, device))
    if not parts:
        raise InvalidArgument("no image to embed", field="images")
    return np.concatenate(parts)


def _encode_image_batch(
    model: ClipModel, batch: list[torch.Tensor], device: str | torch.device
) -> np.ndarray:
    features = model.encode_image(torch.stack(batch).to(device))
    return _unit_rows_l2(features.float().cpu().numpy())


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
    if method not in METHODS:
        raise InvalidArgument(
            f"unknown similarity function {method!r}; allowed: {', '.join(METHODS)}",
            field="similarity_function",
        )
    return method


def prepare_concepts(method: str, similarity: np.ndarray) -> np.ndarray:
    """Turn S (N, C) into the (N, C) float32 matrix that `unit_rows` reads, once per layer.

    soft_wpmi, wpmi: S itself (no copy when it is float32 already). cos: columns of S
    divided by their L2 norm over images. cos_cubed: columns centred, cubed, then divided
    by max(L2 norm, 1e-3).
    """
    check_method(method)
    if method == "cos":
        return _columns_l2(np.asarray(similarity, dtype=np.float32))
    if method == "cos_cubed":
        return _columns_cubed(np.asarray(similarity, dtype=np.float32))
    return np.asarray(similarity, dtype=np.float32)


def unit_rows(method: str, activations: np.ndarray, prepared: np.ndarray) -> np.ndarray:
    """Step 1, one unit block: (N, B) activations of units [u0, u1) -> (B, C) float32 rows.

    `prepared` is `prepare_concepts(method, S)`. For soft_wpmi and wpmi the rows are
    L[k, m] (see `WpmiParams`), to be finished by `layer_similarity` together with every
    other block of the layer; for cos and cos_cubed they are the final similarities.
    A row depends only on its own unit's activations, never on the other units of the block.
    """
    check_method(method)
    # a block is often a column slice of the layer's (N, U) array: copy it compactly once
    activations = np.ascontiguousarray(activations, dtype=np.float32)
    if activations.ndim != 2 or prepared.ndim != 2 or len(activations) != len(prepared):
        raise InvalidArgument(
            f"activations {activations.shape} and concept matrix {prepared.shape} must be "
            "(N, units) and (N, concepts) over the same images",
            field="activations",
        )
    if not np.isfinite(activations).all():
        raise InvalidArgument("activations hold NaN or infinite values", field="activations")
    if method == "cos":
        return _columns_l2(activations).T @ prepared
    if method == "cos_cubed":
        return _columns_cubed(activations).T @ prepared
    return _wpmi_rows(activations, prepared, _WPMI_PARAMS[method])


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


def describe_units(
    similarity: np.ndarray, concepts: Sequence[str], first_unit: int = 0, top: int = TOP_CONCEPTS
) -> list[UnitDescription]:
    """Label, score and top concepts of every unit from its (U, C) similarity row.

    label = argmax_m sim[k, m] (ties go to the earlier concept), score = max_m sim[k, m];
    unit numbers start at `first_unit`.
    """
    if similarity.shape[1] != len(concepts):
        raise InvalidArgument(
            f"{similarity.shape[1]} similarity columns for {len(concepts)} concepts",
            field="concepts",
        )
    best = top_indices(similarity, min(top, len(concepts)))
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


def descriptions_csv(layer: str, descriptions: Iterable[UnitDescription]) -> str:
    """The reference CSV export: header `layer,unit,description,similarity`, one row per unit."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for d in descriptions:
        writer.writerow((layer, d.unit, d.label, f"{d.score:.6g}"))
    return buffer.getvalue()


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


def _wpmi_rows(activations: np.ndarray, similarity: np.ndarray, params: WpmiParams) -> np.ndarray:
    """L[k, m] for the units of (N, B) `activations` against (N, C) float32 S: (B, C) float32.

    Units go in passes whose top images together fit `_PASS_ELEMENTS` floats. When a pass's
    units share many top images (few images, many units), the pass computes each distinct
    image's softmax row once and gathers it per unit; otherwise each unit's rows are
    computed where they are used, in cache. Either way a unit's row comes out bit for bit
    the same, whatever block or pass it falls in.
    """
    n_images, n_units = activations.shape
    n_concepts = similarity.shape[1]
    k = min(params.top_k, n_images)
    top = top_indices(activations.T, k)
    p, c = params.position_weights(k)
    p_row = torch.from_numpy(p)
    c_col = torch.from_numpy(c)[:, None]
    # factors lie in [min c, 1 + min_prob]: `group` of them multiply to at least e^-80
    group = min(k, max(1, int(_LOG_PRODUCT_FLOOR // max(-math.log(float(c.min())), 1e-3))))
    per_step = max(1, _STEP_ELEMENTS // (group * n_concepts))
    # buffers are reused: a fresh large tensor costs a page fault per 4 KiB
    factors_buffer = torch.empty(per_step * group * n_concepts)
    product_buffer = torch.empty(per_step * n_concepts)
    shared_buffer = torch.empty((0, n_concepts))
    rows = torch.empty((n_units, n_concepts))
    for u0, u1 in _unit_passes(top, n_images, max(k, _PASS_ELEMENTS // n_concepts)):
        images, where = np.unique(top[u0:u1], return_inverse=True)
        shared = len(images) <= _SHARED_BELOW * (u1 - u0) * k
        if shared:
            if len(shared_buffer) < len(images):
                shared_buffer = torch.empty((len(images), n_concepts))
            exps = shared_buffer[: len(images)]
            exp_sums = _exp_rows(similarity, images, params.a, exps)
            position = torch.from_numpy(where.reshape(u1 - u0, k))
        for v0 in range(u0, u1, per_step):
            b = min(per_step, u1 - v0)
            acc = rows[v0 : v0 + b]
            acc.zero_()
            product = product_buffer[: b * n_concepts].view(b, n_concepts)
            for j0 in range(0, k, group):
                j1 = min(j0 + group, k)
                factors = factors_buffer[: b * (j1 - j0) * n_concepts].view(-1, n_concepts)
                if shared:
                    picked = position[v0 - u0 : v0 - u0 + b, j0:j1].reshape(-1)
                    torch.index_select(exps, 0, picked, out=factors)
                    sums = exp_sums[picked]
                else:
                    sums = _exp_rows(similarity, top[v0 : v0 + b, j0:j1].ravel(), params.a, factors)
                # c_j + p_j·P̃ with P̃ = exp row / its sum
                scale = (p_row[j0:j1] / sums.view(b, j1 - j0))[..., None]
                by_unit = factors.view(b, j1 - j0, n_concepts)
                by_unit.mul_(scale).add_(c_col[j0:j1])
                torch.prod(by_unit, dim=1, out=product)
                acc.add_(product.log_())
    return rows.numpy()


def _unit_passes(top: np.ndarray, n_images: int, max_images: int) -> list[tuple[int, int]]:
    """Cut units into consecutive ranges [u0, u1) needing at most `max_images` distinct images.

    `top` (B, κ) holds each unit's top images.
    """
    seen = np.zeros(n_images, dtype=bool)
    passes = []
    start, count = 0, 0
    for u, images in enumerate(top):
        new = images[~seen[images]]
        if count + len(new) > max_images:
            passes.append((start, u))
            seen[:] = False
            start, count, new = u, 0, images
        seen[new] = True
        count += len(new)
    passes.append((start, len(top)))
    return passes


def _exp_rows(
    similarity: np.ndarray, images: np.ndarray, a: float, out: torch.Tensor
) -> torch.Tensor:
    """Write exp(a·(S[i] - max S[i])) for each image i of `images` into `out` (len(images), C).

    These are the softmax rows over concepts before division; returns their (len(images),)
    sums. Works in cache-sized steps, and uses exp2 of a rescaled argument, which torch
    computes twice as fast as exp on CPU.
    """
    step = max(1, _STEP_ELEMENTS // similarity.shape[1])
    scale = a / math.log(2.0)
    target = out.numpy()
    sums = np.empty(len(images), dtype=np.float32)
    for r0 in range(0, len(images), step):
        chunk = images[r0 : r0 + step]
        # mode="clip" (indices are valid anyway) lets numpy write into `out` without a copy
        np.take(similarity, chunk, axis=0, out=target[r0 : r0 + len(chunk)], mode="clip")
        logits = out[r0 : r0 + len(chunk)]
        logits.sub_(logits.amax(dim=1, keepdim=True)).mul_(scale).exp2_()
        # numpy sums each row alone in a fixed order; a torch reduction may split a long row
        # across threads, and a unit's row must not depend on what else shares its chunk
        np.sum(target[r0 : r0 + len(chunk)], axis=1, out=sums[r0 : r0 + len(chunk)])
    return torch.from_numpy(sums)


def _log_marginal(rows: np.ndarray) -> np.ndarray:
    """Log p̄(m) = logsumexp_k L[k, m] - log K of (K, C) rows, in float64: (C,)."""
    n_units, n_concepts = rows.shape
    out = np.empty(n_concepts, dtype=np.float64)
    step = max(1, _PASS_ELEMENTS // max(n_units, 1))
    for c0 in range(0, n_concepts, step):
        block = torch.from_numpy(np.ascontiguousarray(rows[:, c0 : c0 + step], dtype=np.float64))
        out[c0 : c0 + block.shape[1]] = torch.logsumexp(block, dim=0).numpy()
    return out - math.log(n_units)


def _columns_l2(x: np.ndarray) -> np.ndarray:
    """Columns of (N, M) `x` divided by their L2 norm (zero columns stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=0, keepdims=True), _TINY)


def _columns_cubed(x: np.ndarray, min_norm: float = 1e-3) -> np.ndarray:
    """Columns of (N, M) `x` centred, cubed and divided by max(L2 norm, `min_norm`)."""
    cubed = (x - x.mean(axis=0, keepdims=True)) ** 3
    return cubed / np.maximum(np.linalg.norm(cubed, axis=0, keepdims=True), min_norm)
