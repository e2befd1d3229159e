"""Masks on a unit's activation grid for spatial compositional formulas.

Follows specs/compositional_spatial.md (reference: Harth 2022, rafaelharth/indres).
The unit's mask is its raw activation map thresholded on the layer's own h×w grid;
label masks (mask resolution, H×W) are downsampled to that grid by

- `manual` (fraction t): cell (i, j) covers pixel rows floor(i·H/h) … floor((i+1)·H/h) − 1
  (columns alike) and is on iff at least the fraction t of its pixels are on;
- `nearest`: the pixel at the cell's centre, floor((i + ½)·H/h), which is what PIL
  does when it resizes a mode "1" (boolean) image;
- `bilinear`: bilinear interpolation of the mask as floats (half-pixel centres, no
  antialiasing, torch's `interpolate`), on iff ≥ 0.5. Where a cell spans more than
  two pixels it reads only the two around its centre, so it can differ from `nearest`
  only where those two disagree.

Grid masks are bit-packed per image ("bitboards"): cell (i, j) is bit b = i·w + j,
held in word b // 64 at bit b % 64 of a (..., N, W) uint64 array, W = ceil(h·w / 64);
bits from h·w on are always 0. A 7×7 image is one word, so AND, OR, NOT, a shift
(a neighbour lookup) and a popcount are one machine operation per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.common.spec_vocabulary import (
    EXPANSION_NEIGHBOURS,
    GRID_DOWNSAMPLINGS,
    MANUAL_FRACTION,
    GridDownsampling,
)


def cell_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) int64 pixel edges: cell i covers pixels edges[i] … edges[i + 1] − 1."""
    return np.arange(cells + 1, dtype=np.int64) * size // cells


def _bilinear_taps(size: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: (cells,) low and high source pixels and the high one's weight (torch's rule)."""
    source = np.maximum((np.arange(cells) + 0.5) * size / cells - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    return low, high, source - low


def label_grid_masks(
    pixel: np.ndarray,
    image: np.ndarray,
    labels: np.ndarray,
    grid: Grid,
    method: GridDownsampling = "manual",
    fraction: float = MANUAL_FRACTION.default,
) -> np.ndarray:
    """Bitboards (L, n, W) uint64 of `labels` (L,) in one chunk of label maps.

    `pixel` (n, planes, H, W) int32 label numbers at mask resolution, downsampled to
    the grid (a pixel holds a label when any plane does); `image` (n, Q) int32
    image-level labels, each the whole grid. Works on the (image, cell, label)
    triples present, never on a dense mask per label.
    """
    n, planes, height, width = pixel.shape
    h, w = grid.h, grid.w
    column = {int(label): k for k, label in enumerate(labels.tolist())}
    largest = max([*column, int(pixel.max(initial=0)), int(image.max(initial=0))])
    lookup = np.full(largest + 1, -1, dtype=np.int64)
    lookup[list(column)] = list(column.values())
    lookup[0] = -1
    if method == "manual":
        rows, cols = cell_edges(height, h), cell_edges(width, w)
        if (np.diff(rows) == 0).any() or (np.diff(cols) == 0).any():
            raise ValueError(f"a {h}×{w} grid has empty cells on {height}×{width} masks")
        cell_of = (np.searchsorted(rows, np.arange(height), "right") - 1)[:, None] * w + (
            np.searchsorted(cols, np.arange(width), "right") - 1
        )
        flat = pixel.reshape(n, planes, height * width)
        columns = lookup[flat]  # (n, planes, S) label columns, −1 for unwanted
        for p in range(1, planes):  # a label in several planes of one pixel counts once
            again = (flat[:, p : p + 1] == flat[:, :p]).any(axis=1)
            columns[:, p][again] = -1
        area = (np.diff(rows)[:, None] * np.diff(cols)[None, :]).reshape(-1)
        on = _cells_at_least(columns, cell_of.reshape(-1), area * fraction, grid.cells, len(labels))
    elif method == "nearest":
        centre_rows = ((2 * np.arange(h) + 1) * height) // (2 * h)
        centre_cols = ((2 * np.arange(w) + 1) * width) // (2 * w)
        sampled = pixel[:, :, centre_rows[:, None], centre_cols[None, :]]
        image_of, cell, k = _distinct(sampled.reshape(n, planes, grid.cells), lookup, len(labels))
        on = np.unique((image_of * grid.cells + cell) * len(labels) + k)
    elif method == "bilinear":
        (r0, r1, wr), (c0, c1, wc) = _bilinear_taps(height, h), _bilinear_taps(width, w)
        keys, weights_list = [], []
        for rows_at, row_weight in ((r0, 1 - wr), (r1, wr)):
            for cols_at, col_weight in ((c0, 1 - wc), (c1, wc)):
                tap = pixel[:, :, rows_at[:, None], cols_at[None, :]]
                image_of, cell, k = _distinct(tap.reshape(n, planes, grid.cells), lookup,
                                              len(labels))
                keys.append((image_of * grid.cells + cell) * len(labels) + k)
                weights_list.append((row_weight[:, None] * col_weight[None, :]).reshape(-1)[cell])
        key = np.concatenate(keys)
        triples, index = np.unique(key, return_inverse=True)
        # Taps that share a pixel (clamped at the border) add their weights, as torch does.
        weights = np.bincount(index, weights=np.concatenate(weights_list))
        on = triples[weights >= 0.5 - 1e-9]
    else:
        raise ValueError(f"downsampling must be one of {GRID_DOWNSAMPLINGS}, got {method!r}")
    out = np.zeros((len(labels), n, grid.words), dtype=np.uint64)
    k, rest = on % len(labels), on // len(labels)
    image_of, cell = rest // grid.cells, rest % grid.cells
    np.bitwise_or.at(
        out, (k, image_of, cell // 64), np.left_shift(np.uint64(1), (cell % 64).astype(np.uint64))
    )
    whole = lookup[image]  # (n, Q) columns of the image-level labels, −1 for none
    for q in range(image.shape[1]):
        present = np.flatnonzero(whole[:, q] >= 0)
        out[whole[present, q], present] = grid.valid
    return out


def _cells_at_least(
    columns: np.ndarray, cell_of: np.ndarray, needed: np.ndarray, cells: int, n_labels: int
) -> np.ndarray:
    """Keys (image·P + cell)·L + column of the cells holding at least `needed` pixels.

    `columns` (n, planes, S) int64 label columns of every pixel (−1: none), `cell_of`
    (S,) each pixel's cell, `needed` (P,) float pixels per cell. Counted by bincount
    over images in batches whose count table stays small.
    """
    n = len(columns)
    batch = max(1, (1 << 22) // (cells * max(n_labels, 1)))
    found = []
    for i0 in range(0, n, batch):
        part = columns[i0 : i0 + batch]
        wanted = part >= 0
        image_of = np.broadcast_to(np.arange(len(part))[:, None, None], part.shape)[wanted]
        cell = np.broadcast_to(cell_of, part.shape)[wanted]
        key = (image_of * cells + cell) * n_labels + part[wanted]
        count = np.bincount(key, minlength=len(part) * cells * n_labels)
        cell_keys = np.arange(len(count)) // n_labels % cells
        # count ≥ t·area, compared exactly for fractions with a small denominator.
        hit = np.flatnonzero(count * 1_000_000 >= np.rint(needed[cell_keys] * 1_000_000))
        hit = hit[count[hit] > 0]
        found.append(hit + i0 * cells * n_labels)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _distinct(
    values: np.ndarray, lookup: np.ndarray, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, planes, S) label numbers -> distinct (image, position, label column) of wanted labels.

    `lookup` maps a label number to its column (−1: not wanted); each returned array is (T,).
    """
    n, _, size = values.shape
    k = lookup[values]
    image_of = np.broadcast_to(np.arange(n)[:, None, None], values.shape)
    position = np.broadcast_to(np.arange(size)[None, None, :], values.shape)
    wanted = k >= 0
    key = np.unique((image_of[wanted] * size + position[wanted]) * n_labels + k[wanted])
    return key // n_labels // size, key // n_labels % size, key % n_labels


def expand(grid_masks: np.ndarray, neighbours: int = EXPANSION_NEIGHBOURS.default) -> np.ndarray:
    """One dilation `label-X`: (..., h, w) bool -> (..., h, w) bool.

    An off cell turns on iff at least `neighbours` of its 8 neighbours (inside the
    grid) are on; on cells stay on.
    """
    lead = ((0, 0),) * (grid_masks.ndim - 2)
    padded = np.pad(grid_masks.astype(np.int8), (*lead, (1, 1), (1, 1)))
    h, w = grid_masks.shape[-2:]
    count = sum(
        padded[..., 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
        for di in (-1, 0, 1)
        for dj in (-1, 0, 1)
        if di or dj
    )
    return grid_masks | (count >= neighbours)


@dataclass(frozen=True, eq=False)
class Grid:
    """An h×w activation grid and its bitboard layout."""

    h: int
    w: int
    words: int = field(init=False)
    valid: np.ndarray = field(init=False, repr=False)  # (W,) uint64: bits of real cells
    _columns: dict[int, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.h < 1 or self.w < 1:
            raise ValueError(f"a grid needs positive sides, got {self.h}×{self.w}")
        object.__setattr__(self, "words", -(-self.cells // 64))
        every = np.ones((1, self.h, self.w), dtype=bool)
        object.__setattr__(self, "valid", self.pack(every)[0])
        columns = {}
        for dj in range(-2, 3):
            keep = np.zeros((1, self.h, self.w), dtype=bool)
            keep[:, :, max(0, -dj) : self.w - max(0, dj)] = True
            columns[dj] = self.pack(keep)[0]
        object.__setattr__(self, "_columns", columns)

    @property
    def cells(self) -> int:
        """P = h·w cells per image."""
        return self.h * self.w

    def pack(self, grid_masks: np.ndarray) -> np.ndarray:
        """(..., h, w) bool -> (..., W) uint64 bitboards."""
        lead = grid_masks.shape[:-2]
        flat = grid_masks.reshape(*lead, self.cells).astype(bool)
        padded = np.zeros((*lead, self.words * 64), dtype=bool)
        padded[..., : self.cells] = flat
        packed = np.packbits(padded.reshape(*lead, self.words, 8, 8), axis=-1, bitorder="little")
        return packed.reshape(*lead, self.words * 8).view("<u8").astype(np.uint64)

    def unpack(self, bits: np.ndarray) -> np.ndarray:
        """(..., W) uint64 bitboards -> (..., h, w) bool."""
        lead = bits.shape[:-1]
        raw = np.ascontiguousarray(bits, dtype="<u8").view(np.uint8)
        flat = np.unpackbits(raw, axis=-1, bitorder="little").astype(bool)
        return flat[..., : self.cells].reshape(*lead, self.h, self.w)

    def complement(self, bits: np.ndarray) -> np.ndarray:
        """NOT over every cell: (..., W) uint64 -> (..., W) uint64."""
        return ~bits & self.valid

    def shift(self, bits: np.ndarray, offset: int) -> np.ndarray:
        """Bit b of the result is bit b + `offset` of `bits` (0 outside): (..., W) uint64."""
        words = self.words
        if words == 1 and -64 < offset < 64:
            return bits >> np.uint64(offset) if offset >= 0 else bits << np.uint64(-offset)
        q, r = divmod(offset, 64)
        padded = np.zeros((*bits.shape[:-1], 3 * words + 2), dtype=np.uint64)
        padded[..., words + 1 : 2 * words + 1] = bits
        start = words + 1 + q
        if not -words - 1 <= q <= words:
            return np.zeros_like(bits)
        low = padded[..., start : start + words]
        if r == 0:
            return low.copy()
        high = padded[..., start + 1 : start + 1 + words]
        return (low >> np.uint64(r)) | (high << np.uint64(64 - r))

    def neighbourhood(self, bits: np.ndarray) -> np.ndarray:
        """Cells with an on cell within distance √5 (21-cell neighbourhood): (..., W) uint64.

        The 5×5 box minus its corners is the union of a 5-row × 3-column box and a
        3-row × 5-column box; each is a dilation along columns, then along rows.
        """
        out = np.zeros_like(bits)
        for col_reach, row_reach in ((1, 2), (2, 1)):
            across = np.zeros_like(bits)
            for dj in range(-col_reach, col_reach + 1):
                across |= self.shift(bits, dj) & self._columns[dj]
            for di in range(-row_reach, row_reach + 1):
                out |= self.shift(across, di * self.w)
        return out & self.valid


def popcount(bits: np.ndarray) -> np.ndarray:
    """On cells per bitboard: (..., W) uint64 -> (...) int64."""
    if bits.shape[-1] == 1:  # grids up to 64 cells (7×7, 8×8): no reduction needed
        return np.bitwise_count(bits[..., 0]).astype(np.int64)
    return np.bitwise_count(bits).sum(axis=-1, dtype=np.int64)


def nonempty(bits: np.ndarray) -> np.ndarray:
    """Whether each bitboard has an on cell: (..., W) uint64 -> (...) bool."""
    return (bits != 0).any(axis=-1)
