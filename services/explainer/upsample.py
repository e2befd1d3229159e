"""Bilinear resizing of unit maps to mask resolution, bit for bit PIL's BILINEAR.

Network Dissection and compositional explanations both threshold a unit's raw map
after resizing it to the label maps' resolution. For upsampling, PIL's BILINEAR
filter is bilinear interpolation with `align_corners=False` (pixel centres at
i + 0.5, edge pixels clamped). `BilinearResize` reproduces PIL's arithmetic
exactly: per-axis coefficients computed as PIL's `precompute_coeffs`, a horizontal
pass accumulated in float64 from 0.0 and rounded to float32, then a vertical pass
the same way. Equal values keep counts identical to NetDissect-Lite, which resizes
with PIL. (For downsampling PIL widens the filter, which is reproduced too, but
Pillow may then run the vertical pass first, which can move results by one ulp.)

`BilinearResize.runs_above` finds the pixels of `resize(map) > t` without resizing
whole maps:

1. The output grid splits into tiles whose pixels read the same source taps. The
   coefficients are non-negative and sum to one, so no pixel exceeds the largest
   of its taps, also after rounding (each rounding lands on the nearest float32
   and the taps are float32). Only tiles with a tap above t are looked at.
2. Inside them, the horizontal pass is computed, and a column whose two source
   rows both stay at or below t is dropped by the same argument.
3. Down a column of a band, the value moves monotonically from one source row's
   value to the other's (two taps whose weights shift one way), so the pixels
   above t form one run. Its end is located analytically and then confirmed
   with PIL's exact arithmetic on the rows on both sides of it; a column that
   does not confirm, or a band that is not two monotone taps, is evaluated
   row by row.

The result equals thresholding the dense resize (tested against it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_BILINEAR_SUPPORT = 1.0


@dataclass(frozen=True)
class ResizeAxis:
    """PIL's resampling coefficients along one axis, grouped into bands.

    Output position o is `Σ_k weight[o, k] · input[index[o, k]]`, summed in k order
    from 0.0. A band is a run of output positions that read the same input
    positions; bands with equal weights share a pattern.
    """

    index: np.ndarray  # (n_out, K) int64 input positions (padding taps have weight 0)
    weight: np.ndarray  # (n_out, K) float64
    band_start: np.ndarray  # (B,) int64 first output position of each band
    band_taps: np.ndarray  # (B, K) int64 input positions read by each band
    band_pattern: np.ndarray  # (B,) int64 pattern of each band
    patterns: tuple[np.ndarray, ...]  # per pattern: (length, K) float64 weights
    monotone: tuple[bool, ...]  # per pattern: two taps, weight moving from first to second


@functools.cache
def resize_axis(n_in: int, n_out: int) -> ResizeAxis:
    """Return PIL's BILINEAR coefficients for resizing `n_in` positions to `n_out`."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    # As PIL: the box edge is a C float, scale and centres are doubles.
    scale = float(np.float32(n_in)) / n_out
    filterscale = max(scale, 1.0)
    support = _BILINEAR_SUPPORT * filterscale
    ss = 1.0 / filterscale
    taps: list[list[int]] = []
    weights: list[list[float]] = []
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), n_in) - xmin
        row = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(count)]
        total = 0.0
        for w in row:
            total += w
        taps.append([xmin + x for x in range(count)])
        weights.append([w / total for w in row] if total != 0.0 else row)
    k = max(len(t) for t in taps)
    index = np.array([t + [t[0]] * (k - len(t)) for t in taps], dtype=np.int64)
    weight = np.array([w + [0.0] * (k - len(w)) for w in weights], dtype=np.float64)
    starts = [0] + [o for o in range(1, n_out) if not np.array_equal(index[o], index[o - 1])]
    stops = [*starts[1:], n_out]
    keys: dict[bytes, int] = {}
    band_pattern = []
    patterns: list[np.ndarray] = []
    for a, b in zip(starts, stops, strict=True):
        block = weight[a:b]
        key = block.tobytes()
        if key not in keys:
            keys[key] = len(patterns)
            patterns.append(block)
        band_pattern.append(keys[key])
    monotone = tuple(
        p.shape[1] == 2 and bool(np.all(np.diff(p[:, 0]) <= 0) and np.all(np.diff(p[:, 1]) >= 0))
        for p in patterns
    )
    return ResizeAxis(
        index=index,
        weight=weight,
        band_start=np.array(starts, dtype=np.int64),
        band_taps=index[starts],
        band_pattern=np.array(band_pattern, dtype=np.int64),
        patterns=tuple(patterns),
        monotone=monotone,
    )


def _accumulate(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return float32(Σ_k values[..., k] · weights[..., k]) summed from 0.0 in float64, as PIL.

    `values` (..., K) float32 and `weights` broadcastable to it, K last.
    """
    total = values[..., 0].astype(np.float64) * weights[..., 0]
    for k in range(1, values.shape[-1]):
        total += values[..., k].astype(np.float64) * weights[..., k]
    return total.astype(np.float32)


def _rounding_cut(thresholds: np.ndarray) -> np.ndarray:
    """Return (m,) float64 cuts with `float32(v) > t  ⟺  v > cut` for any float64 v.

    Values between t and the next float32 round down to t unless they pass the
    midpoint; the midpoint itself rounds to the neighbour with an even mantissa.
    """
    t = thresholds.astype(np.float32)
    up = np.nextafter(t, np.float32(np.inf))
    mid = (t.astype(np.float64) + up.astype(np.float64)) / 2
    rounds_up = (up.view(np.uint32) & 1) == 0
    return np.where(rounds_up, np.nextafter(mid, -np.inf), mid)


@dataclass(frozen=True)
class PixelRuns:
    """Runs of output pixels down one column: rows y[j] .. y[j] + length[j] - 1 of column x[j]."""

    index: np.ndarray  # (r,) int64 map of each run
    band: np.ndarray  # (r,) int64 row band holding the run
    x: np.ndarray  # (r,) int64
    y: np.ndarray  # (r,) int64 first row
    length: np.ndarray  # (r,) int64, >= 1


@functools.cache
def bilinear_resize(in_size: tuple[int, int], out_size: tuple[int, int]) -> BilinearResize:
    """Return the (cached) resizer from `in_size` (h, w) to `out_size` (sh, sw)."""
    return BilinearResize(in_size, out_size)


class BilinearResize:
    """Resize (h, w) maps to (sh, sw) exactly as PIL's `Image.resize(..., BILINEAR)`."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        self.in_size = in_size
        self.out_size = out_size
        self.rows = resize_axis(in_size[0], out_size[0])
        self.cols = resize_axis(in_size[1], out_size[1])

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """Resize (m, h, w) float32 maps to (m, sh, sw) float32."""
        maps = np.asarray(maps, dtype=np.float32)
        horizontal = _accumulate(maps[:, :, self.cols.index], self.cols.weight)  # (m, h, sw)
        stacked = horizontal[:, self.rows.index, :]  # (m, sh, K, sw)
        return _accumulate(np.moveaxis(stacked, 2, -1), self.rows.weight[:, None, :])

    def runs_above(self, maps: np.ndarray, thresholds: np.ndarray) -> Iterator[PixelRuns]:
        """Yield, in groups, the pixels where `self(maps)[i] > thresholds[i]`.

        `maps` (m, h, w) float32, `thresholds` (m,) float32. Every such pixel lies in
        exactly one run; runs do not overlap; within a group runs are sorted by map.
        """
        maps = np.asarray(maps, dtype=np.float32)
        thresholds = np.asarray(thresholds, dtype=np.float32)
        rows, cols = self.rows, self.cols
        row_max = maps[:, rows.band_taps, :].max(axis=2)  # (m, By, w)
        tile_max = row_max[:, :, cols.band_taps].max(axis=3)  # (m, By, Bx)
        live = tile_max > thresholds[:, None, None]
        cut = _rounding_cut(thresholds)
        for py in range(len(rows.patterns)):
            band_y = np.flatnonzero(rows.band_pattern == py)
            for px in range(len(cols.patterns)):
                band_x = np.flatnonzero(cols.band_pattern == px)
                index, iy, ix = np.nonzero(live[:, band_y[:, None], band_x[None, :]])
                if len(index):
                    yield from self._tile_runs(
                        maps, thresholds, cut, index, band_y[iy], band_x[ix], py, px
                    )

    def _tile_runs(
        self,
        maps: np.ndarray,
        thresholds: np.ndarray,
        cut: np.ndarray,
        index: np.ndarray,
        band_y: np.ndarray,
        band_x: np.ndarray,
        py: int,
        px: int,
    ) -> Iterator[PixelRuns]:
        """Runs above threshold inside k tiles of one (row, column) pattern pair.

        `index`, `band_y`, `band_x` (k,) int64 name each tile's map and bands.
        """
        rows, cols = self.rows, self.cols
        wy, wx = rows.patterns[py], cols.patterns[px]  # (ly, Ky), (lx, Kx)
        taps_y = rows.band_taps[band_y]  # (k, Ky)
        taps_x = cols.band_taps[band_x]  # (k, Kx)
        h, w = maps.shape[1:]
        at = (index * (h * w))[:, None, None] + taps_y[:, :, None] * w + taps_x[:, None, :]
        corners = maps.reshape(-1)[at]  # (k, Ky, Kx)
        # Horizontal pass over the tile's columns for each source row: (k, Ky, lx).
        horizontal = _accumulate(corners[:, :, None, :], wx[None, None, :, :])
        _, n_taps, lx = horizontal.shape
        live = np.flatnonzero(horizontal.max(axis=1) > thresholds[index, None])  # into (k, lx)
        tile = live // lx
        at = tile * (n_taps * lx) + (live - tile * lx)
        # Source-row values of each live column, exact as float64: (c, Ky).
        flat = horizontal.reshape(-1)
        column = np.empty((len(at), n_taps), dtype=np.float64)
        for j in range(n_taps):
            column[:, j] = flat[at + j * lx]
        map_index = index[tile]
        band = band_y[tile]
        x = cols.band_start[band_x[tile]] + (live - tile * lx)
        y0 = rows.band_start[band]
        column_cut = cut[map_index]
        unsure = np.arange(len(live))
        if rows.monotone[py]:
            first, stop, sure = _monotone_runs(column, wy, column_cut)
            keep = sure & (stop > first)
            yield PixelRuns(map_index[keep], band[keep], x[keep], y0[keep] + first[keep],
                            (stop - first)[keep])
            unsure = np.flatnonzero(~sure)
        if len(unsure):
            values = column[unsure, None, 0] * wy[:, 0]
            for j in range(1, n_taps):
                values += column[unsure, None, j] * wy[:, j]
            hit, row = np.nonzero(values > column_cut[unsure, None])
            hit = unsure[hit]
            yield PixelRuns(map_index[hit], band[hit], x[hit], y0[hit] + row,
                            np.ones(len(hit), dtype=np.int64))


def _monotone_runs(
    column: np.ndarray, weights: np.ndarray, cut: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Locate the run above `cut` down c columns of a monotone two-tap band.

    `column` (c, 2) float64 source-row values, `weights` (ly, 2), `cut` (c,) float64.
    Returns rows [first, stop) (c,) int64 and (c,) bool telling which columns PIL's
    exact arithmetic confirmed on the rows just inside and just outside the run.
    """
    ly = len(weights)
    w0, w1 = weights[:, 0], weights[:, 1]
    low, high = column[:, 0], column[:, 1]
    delta = high - low
    falling = delta < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # value(r) ≈ low + delta · w1[r] crosses the cut here.
        crossing = (cut - low) / delta
    flat = np.flatnonzero(delta == 0)  # all above or all below
    crossing[flat] = np.where(low[flat] > cut[flat], -np.inf, np.inf)
    # Rows with w1 > crossing (rising) or < crossing (falling) are above; a weight
    # equal to the crossing is caught by the check below.
    edge = np.searchsorted(w1, crossing, side="right")
    prev, at = np.maximum(edge - 1, 0), np.minimum(edge, ly - 1)
    before = (low * w0[prev] + high * w1[prev] > cut) & (edge > 0)  # row edge - 1 is above
    after = (low * w0[at] + high * w1[at] > cut) & (edge < ly)  # row edge is above
    sure = np.where(falling, (before | (edge == 0)) & ~after, ~before & (after | (edge == ly)))
    return np.where(falling, 0, edge), np.where(falling, edge, ly), sure
