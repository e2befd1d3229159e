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
whole maps, for any sizes (downsampling included) as follows:

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

`BilinearResize.column_runs` (what `count_masks` uses; `runs_above` goes through it)
is the same idea with less work, for upsampling, where every band reads two taps
with weights moving linearly along it, or one tap:

1. Live tiles come from the source cells above t: a 2×2 OR of cells per tile.
2. Tiles on the edge bands read one tap along an axis, so their values are
   constant along it: every live column's run is the whole band (one source row
   decides which columns), or every column has the same run (one crossing
   between the two source rows); such runs come out whole, as `TileRuns`.
3. In the other tiles, each source row's horizontal values cross t at most once,
   at a column found from the crossing weight; the columns between the extreme
   crossings get PIL's horizontal pass, and each column's run end is found the
   same way, as `ColumnRuns`.

A crossing estimate is trusted only when it lies farther from the next row
(column) than the rounding of PIL's arithmetic can move it (see `_BandSearch`);
otherwise the tile's whole band width is taken, or the column is evaluated row by row.
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


@dataclass(frozen=True)
class ColumnRuns:
    """Runs of output pixels down columns, for maps [maps[0], maps[1]), grouped in tiles.

    Tile k lies in map tile_map[k] and row band tile_band[k]. Column j belongs to tile
    column_tile[j]; rows first[j] .. stop[j] - 1 of its column x[j], counted from the
    band's first row, are above the threshold (none when first == stop). Runs do not
    overlap.
    """

    maps: tuple[int, int]
    tile_map: np.ndarray  # (k,) int64
    tile_band: np.ndarray  # (k,) int64
    column_tile: np.ndarray  # (c,) int64
    x: np.ndarray  # (c,) int64
    first: np.ndarray  # (c,) int64 first row above, from the band's first row
    stop: np.ndarray  # (c,) int64 one past the last

    @classmethod
    def of_runs(cls, maps: tuple[int, int], runs: PixelRuns, band_start: np.ndarray) -> ColumnRuns:
        """The same pixels as `runs`, one tile per run."""
        first = runs.y - band_start[runs.band]
        return cls(maps, runs.index, runs.band, np.arange(len(runs.x)), runs.x, first,
                   first + runs.length)

    def pixel_runs(self, band_start: np.ndarray) -> PixelRuns:
        """The non-empty runs as `PixelRuns`, sorted by map."""
        keep = np.flatnonzero(self.stop > self.first)
        keep = keep[np.argsort(self.tile_map[self.column_tile[keep]], kind="stable")]
        tile = self.column_tile[keep]
        band = self.tile_band[tile]
        return PixelRuns(self.tile_map[tile], band, self.x[keep],
                         band_start[band] + self.first[keep], (self.stop - self.first)[keep])


@dataclass(frozen=True)
class TileRuns:
    """Runs shared by every column of a range, for maps [maps[0], maps[1]).

    In tile k (map tile_map[k], row band tile_band[k]), columns left[k] ..
    left[k] + count[k] - 1 all hold rows first[k] .. stop[k] - 1 above the threshold,
    counted from the band's first row.
    """

    maps: tuple[int, int]
    tile_map: np.ndarray  # (k,) int64
    tile_band: np.ndarray  # (k,) int64
    left: np.ndarray  # (k,) int64 first column
    count: np.ndarray  # (k,) int64 number of columns
    first: np.ndarray  # (k,) int64
    stop: np.ndarray  # (k,) int64

    def columns(self) -> ColumnRuns:
        """The same runs, column by column."""
        tile, x = expand_ranges(np.arange(len(self.left)), self.left, self.count)
        return ColumnRuns(self.maps, self.tile_map, self.tile_band, tile, x, self.first[tile],
                          self.stop[tile])


# An estimated crossing is trusted when it lies this far (in weight units) from the
# nearest output position's weight. PIL's arithmetic moves a value by a few ulps of
# float64, and two distinct float32 values differ by at least 2**-25 of the larger,
# so the crossing weight moves by less than 2**-23 (see `_BandSearch`).
_WEIGHT_SLACK = 2.0**-22


@dataclass(frozen=True)
class _BandSearch:
    """Per band of one axis: what locating a crossing analytically needs.

    Only for axes whose bands all read two taps (`K == 2`) with the second weight
    w1 rising linearly along the band, w1[start + r] ≈ w1[start] + step·r, or read
    the same input position twice (constant values along the band).

    With two taps holding float32 values lo != hi, PIL's value at position r is
    lo·w0[r] + hi·w1[r] up to a few float64 ulps; since w0 + w1 = 1 (to an ulp) it
    exceeds a cut c iff w1[r] is beyond (c - lo) / (hi - lo). The estimate
    z = ((c - lo) / (hi - lo) - w1[start]) / step is the position where that
    happens; its error is below `tolerance` positions (rounding, and the weights'
    distance from a line), so when z lies farther than that from every integer,
    floor(z) + 1 is exactly the first position above (rising) or the end of the
    positions above (falling). `_crossing_at` works on z' = z + 1/2 (folded into
    `offset`), where floor(z) + 1 = rint(z') and the test is |z' - rint(z')| < margin.
    """

    start: np.ndarray  # (B,) int64 first output position of each band
    stop: np.ndarray  # (B,) int64 one past its last
    length: np.ndarray  # (B,) int64
    taps: np.ndarray  # (B, 2) int64 input positions read by each band
    w0: np.ndarray  # (n_out,) float64 first weight of every output position
    w1: np.ndarray  # (n_out,) float64 second weight
    inv_step: np.ndarray  # (B,) float64 1 / step (1 for constant bands)
    offset: np.ndarray  # (B,) float64 w1[start] / step - 1/2 (see `_crossing_at`)
    margin: np.ndarray  # (B,) float64 0.5 - tolerance: z' this close to an integer is exact
    same_tap: np.ndarray  # (B,) bool the band reads one input position
    reach: np.ndarray  # (B,) float64 length
    holders: np.ndarray  # (n_in, R) int64 bands whose taps include each input position
    consecutive: bool  # band b reads input positions b - 1 and b (clipped), as upsampling does
    # inv_step, offset, margin as scalars when every band can use the same (a band
    # reading one input position can use any: its values never cross inside it).
    uniform: tuple[float, float, float] | None


def _band_search(axis: ResizeAxis) -> _BandSearch | None:
    """Return the band search of a two-tap, linear-weight axis; None for any other."""
    if axis.index.shape[1] != 2:
        return None
    n_out = len(axis.index)
    start = axis.band_start
    stop = np.append(start[1:], n_out)
    inv_step = np.ones(len(start))
    offset = np.full(len(start), -0.5)
    tolerance = np.full(len(start), 0.25)
    for b, (a, z) in enumerate(zip(start.tolist(), stop.tolist(), strict=True)):
        if axis.band_taps[b, 0] == axis.band_taps[b, 1]:
            continue  # one input position: the values are equal along the band
        w1 = axis.weight[a:z, 1]
        step = 1.0 if z - a == 1 else (w1[-1] - w1[0]) / (z - a - 1)
        if not step > 0:
            return None
        deviation = float(np.abs(w1 - (w1[0] + step * np.arange(z - a))).max())
        inv_step[b], offset[b] = 1.0 / step, w1[0] / step - 0.5
        tolerance[b] = (_WEIGHT_SLACK + deviation) / step + 1e-9 * (z - a)
    if np.any(tolerance >= 0.5):
        return None
    n_in = int(axis.index.max()) + 1
    holders = [np.flatnonzero((axis.band_taps == i).any(axis=1)) for i in range(n_in)]
    width = max(len(h) for h in holders)
    same_tap = axis.band_taps[:, 0] == axis.band_taps[:, 1]
    params = {(inv_step[b], offset[b], 0.5 - tolerance[b]) for b in np.flatnonzero(~same_tap)}
    uniform = next(iter(params)) if len(params) == 1 else None
    if not params:
        uniform = (1.0, -0.5, 0.25)
    return _BandSearch(
        start=start,
        stop=stop,
        length=stop - start,
        taps=axis.band_taps,
        w0=np.ascontiguousarray(axis.weight[:, 0]),
        w1=np.ascontiguousarray(axis.weight[:, 1]),
        inv_step=inv_step,
        offset=offset,
        margin=0.5 - tolerance,
        same_tap=same_tap,
        reach=(stop - start).astype(np.float64),
        consecutive=len(start) == n_in + 1 and bool(np.all(
            axis.band_taps == np.clip(np.arange(len(start))[:, None] - [1, 0], 0, n_in - 1)
        )),
        uniform=uniform,
        holders=np.array([[*h, *[h[0]] * (width - len(h))] for h in holders], dtype=np.int64),
    )


def _crossing(
    lo: np.ndarray, hi: np.ndarray, cut: np.ndarray, bands: _BandSearch, band: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Locate where values moving from `lo` to `hi` along `band` cross `cut`.

    `lo`, `hi` (k,) float32 values (any float dtype), `cut` (k,) float64. Returns
    e (k,) int64, falling (k,) bool, sure (k,) bool: when sure, the
    positions above the cut are [e, length) if not falling, [0, e) if falling, and
    0 <= e <= length. NaN values are never sure.
    """
    return _crossing_at(lo, hi, cut, *_crossing_params(bands, band))


def _crossing_params(
    bands: _BandSearch, band: np.ndarray
) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float, np.ndarray]:
    """(inv_step, offset, margin, reach) of `band` for `_crossing_at`, scalars when uniform."""
    if bands.uniform is None:
        return bands.inv_step[band], bands.offset[band], bands.margin[band], bands.reach[band]
    return (*bands.uniform, bands.reach[band])


def _crossing_at(
    lo: np.ndarray,
    hi: np.ndarray,
    cut: np.ndarray,
    inv_step: np.ndarray | float,
    offset: np.ndarray | float,
    margin: np.ndarray | float,
    reach: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_crossing` with the bands' parameters given (see `_BandSearch`, `_crossing_params`).

    Works on z' = z + 1/2 (the offset holds the shift): positions above start at
    floor(z) + 1 = rint(z') unless z' is near a half-integer (z near an integer),
    and clamping z' to [0, length] keeps the ends exact.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN maps
        d = np.subtract(hi, lo, dtype=np.float64)
        d += 0.0  # no -0.0: equal values must give z = -inf above the cut, +inf below
        z = (cut - lo) / d
        z *= inv_step
        z -= offset
        z = np.minimum(np.maximum(z, 0.0), reach)
        nearest = np.rint(z)
        z -= nearest
        sure = np.abs(z) < margin  # False for NaN
        e = nearest.astype(np.int64)
    return e, d < 0, sure


def _select(arrays: tuple[np.ndarray, ...], keep: np.ndarray) -> tuple[np.ndarray, ...]:
    """The elements of each array where `keep` (bool) holds."""
    where = np.flatnonzero(keep)
    return tuple(a[where] for a in arrays)


def expand_ranges(
    owner: np.ndarray, start: np.ndarray, count: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every element of the ranges start[i] .. start[i] + count[i] - 1, in order.

    `owner`, `start`, `count` (k,) int64 → (owner of each element, the element), (Σ count,)
    each; e.g. the columns of tiles, or the segments a tile spans.
    """
    end = np.cumsum(count)
    total = int(end[-1]) if len(end) else 0
    return np.repeat(owner, count), np.arange(total) + np.repeat(start - (end - count), count)


# Maps per group in `column_runs`: keeps the working arrays in cache.
_GROUP_MAPS = 16384


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
        row_search, col_search = _band_search(self.rows), _band_search(self.cols)
        self._search = None if row_search is None or col_search is None else (
            row_search, col_search
        )

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
        if self._search is not None:
            for runs in self.column_runs(maps, thresholds):
                if isinstance(runs, TileRuns):
                    runs = runs.columns()
                yield runs.pixel_runs(self.rows.band_start)
            return
        yield from self._generic_runs(maps, thresholds)

    def column_runs(
        self, maps: np.ndarray, thresholds: np.ndarray
    ) -> Iterator[ColumnRuns | TileRuns]:
        """Yield, in groups, column runs holding the pixels of `self(maps)[i] > thresholds[i]`.

        `maps` (m, h, w) float32, `thresholds` (m,) float32. Every such pixel lies in
        exactly one run; a group covers a range of maps, and ranges come in order
        (several groups may cover the same range).
        """
        maps = np.asarray(maps, dtype=np.float32)
        thresholds = np.asarray(thresholds, dtype=np.float32)
        if self._search is None:
            for runs in self._generic_runs(maps, thresholds):
                yield ColumnRuns.of_runs((0, len(maps)), runs, self.rows.band_start)
            return
        cut = _rounding_cut(thresholds)
        for i0 in range(0, len(maps), _GROUP_MAPS):
            i1 = min(i0 + _GROUP_MAPS, len(maps))
            yield from self._group_column_runs(maps[i0:i1], thresholds[i0:i1], cut[i0:i1], i0)

    def _group_column_runs(
        self, maps: np.ndarray, thresholds: np.ndarray, cut: np.ndarray, i0: int
    ) -> Iterator[ColumnRuns | TileRuns]:
        """`column_runs` of one group of maps, numbered from i0.

        Tiles come in four kinds, by whether their row band and their column band read
        one input position (the edges of an upsampling). Values constant down the band
        make every live column's run the whole band, and its live columns are the
        crossing of one row; values constant across it make every column's run the
        same crossing; both make the tile uniform. Only tiles with two distinct taps
        both ways, or whose crossing was not sure, are resolved column by column.
        """
        assert self._search is not None
        rows, cols = self._search
        whole: list[tuple[np.ndarray, ...]] = []  # index, by, bx, left, count, first, stop
        mixed: list[tuple[np.ndarray, ...]] = []  # index, by, bx, left, count, 4 corners
        for same_row, same_col, index, by, bx, corners in self._tile_kinds(maps, thresholds):
            tile_cut = cut[index]
            left, width, height = cols.start[bx], cols.length[bx], rows.length[by]
            if same_row and same_col:  # one tap, above t: every pixel
                whole.append((index, by, bx, left, width, np.zeros_like(height), height))
            elif same_row:  # the top row's live columns, each whole
                a0, a1 = corners[0], corners[1]
                e, falling, sure = _crossing(a0, a1, tile_cut, cols, bx)
                start, stop = np.where(falling, 0, e), np.where(falling, e, width)
                tiles = (index, by, bx, left + start, stop - start, np.zeros_like(height), height)
                if sure.all():
                    whole.append(tiles)
                    continue
                whole.append(_select(tiles, sure))
                mixed.append(_select((index, by, bx, left, width, a0, a1, a0, a1), ~sure))
            elif same_col:  # every column, one crossing
                a0, a1 = corners[0], corners[2]
                e, falling, sure = _crossing(a0, a1, tile_cut, rows, by)
                tiles = (index, by, bx, left, width, np.where(falling, 0, e),
                         np.where(falling, e, height))
                if sure.all():
                    whole.append(tiles)
                    continue
                whole.append(_select(tiles, sure))
                mixed.append(_select((index, by, bx, left, width, a0, a0, a1, a1), ~sure))
            else:
                a00, a01, a10, a11 = corners
                start, stop = self._live_columns(a00, a01, a10, a11, tile_cut, bx)
                mixed.append((index, by, bx, left + start, stop - start, *corners))
        group = (i0, i0 + len(maps))
        if whole:
            index, by, bx, left, count, first, stop = (
                np.concatenate(a) for a in zip(*whole, strict=True)
            )
            yield TileRuns(group, index + i0, by, left, count, first, stop)
        if mixed:
            index, by, bx, left, count, *taps = (
                np.concatenate(a) for a in zip(*mixed, strict=True)
            )
            yield from self._column_by_column(group, index + i0, by, left, count,
                                              taps, cut[index])

    def _tile_kinds(
        self, maps: np.ndarray, thresholds: np.ndarray
    ) -> Iterator[tuple[bool, bool, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]]:
        """The live tiles, kind by kind: (same_row, same_col, index, by, bx, corners).

        A tile is live when it reads a source cell above t (no pixel exceeds its taps,
        so no other tile holds a pixel above t). `corners` are its taps' values
        (top-left, top-right, bottom-left, bottom-right) as float32.
        """
        assert self._search is not None
        rows, cols = self._search
        h, w = self.in_size
        m = len(maps)
        flat = maps.reshape(-1)
        above = (maps.reshape(m, h * w) > thresholds[:, None]).reshape(-1)
        if rows.consecutive and cols.consecutive:
            # Tile (b, c) reads cells b - 1, b by c - 1, c (clipped; two taps mean
            # h, w >= 2): interior tiles are 2×2 ORs of cells, edge tiles pairs, corner
            # tiles single cells, each found at its first cell.
            pair = np.zeros_like(above)  # cell and its right neighbour
            np.logical_or(above[:-1], above[1:], out=pair[:-1])
            down = np.zeros_like(above)  # cell and the one below
            np.logical_or(above[:-w], above[w:], out=down[:-w])
            square = np.zeros_like(above)
            np.logical_or(pair[:-w], pair[w:], out=square[:-w])
            y, x = np.divmod(np.arange(h * w), w)
            inner_y, inner_x = y < h - 1, x < w - 1
            edge_y, edge_x = (y == 0) | (y == h - 1), (x == 0) | (x == w - 1)
            kinds = [
                (False, False, square, inner_y & inner_x),
                (True, False, pair, edge_y & inner_x),
                (False, True, down, inner_y & edge_x),
                (True, True, above, edge_y & edge_x),
            ]
            # Interior tiles start at cells off the last row and column.
            square.reshape(m, h, w)[:, h - 1, :] = False
            square.reshape(m, h, w)[:, :, w - 1] = False
            for same_row, same_col, grid, where in kinds:
                if same_row or same_col:  # few cells: pick them out first
                    cell = ((np.arange(m) * (h * w))[:, None] + np.flatnonzero(where)).reshape(-1)
                    cell = cell[grid[cell]]
                else:
                    cell = np.flatnonzero(grid)
                if len(cell) == 0:
                    continue
                index, rest = np.divmod(cell, h * w)
                cy, cx = np.divmod(rest, w)
                by = np.where(cy == 0, 0, h) if same_row else cy + 1
                bx = np.where(cx == 0, 0, w) if same_col else cx + 1
                if same_row and same_col:
                    corners: tuple[np.ndarray, ...] = ()
                elif same_row:
                    corners = (flat[cell], flat[cell + 1])
                elif same_col:
                    corners = (flat[cell], flat[cell], flat[cell + w])
                else:
                    corners = (flat[cell], flat[cell + 1], flat[cell + w], flat[cell + w + 1])
                yield same_row, same_col, index, by, bx, corners
            return
        n_by, n_bx = len(rows.start), len(cols.start)
        cell = np.flatnonzero(above)
        index = cell // (h * w)
        y, x = np.divmod(cell - index * (h * w), w)
        tiles = (index[:, None] * n_by + rows.holders[y])[:, :, None] * n_bx
        flat_live = np.zeros(m * n_by * n_bx, dtype=bool)
        flat_live[(tiles + cols.holders[x][:, None, :]).reshape(-1)] = True
        live = flat_live.reshape(m, n_by * n_bx)
        for same_row in (False, True):
            for same_col in (False, True):
                band_y = np.flatnonzero(rows.same_tap == same_row)
                band_x = np.flatnonzero(cols.same_tap == same_col)
                if len(band_y) == 0 or len(band_x) == 0:
                    continue
                tile = np.flatnonzero(live[:, (band_y[:, None] * n_bx + band_x).reshape(-1)])
                index, rest = np.divmod(tile, len(band_y) * len(band_x))
                by, bx = np.divmod(rest, len(band_x))
                by, bx = band_y[by], band_x[bx]
                at = index * (h * w)
                top, bottom = at + rows.taps[by, 0] * w, at + rows.taps[by, 1] * w
                left, right = cols.taps[bx, 0], cols.taps[bx, 1]
                yield same_row, same_col, index, by, bx, (
                    flat[top + left], flat[top + right], flat[bottom + left], flat[bottom + right]
                )

    def _live_columns(
        self,
        a00: np.ndarray,
        a01: np.ndarray,
        a10: np.ndarray,
        a11: np.ndarray,
        cut: np.ndarray,
        bx: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Columns [start, stop) of tiles, from their band's first, that may hold pixels above.

        Those where a source row's horizontal values may exceed the cut: the hull of
        both rows' crossings, or the whole band where a crossing is not sure.
        """
        assert self._search is not None
        cols = self._search[1]
        width = cols.length[bx]
        start, stop = width, np.zeros_like(width)
        for lo, hi in ((a00, a01), (a10, a11)):
            e, falling, sure = _crossing(lo, hi, cut, cols, bx)
            if not sure.all():  # rare (and inf or NaN values): the whole band
                falling = falling & sure
                e = np.where(sure, e, 0)
            alive = np.maximum(lo, hi) > cut  # else every value is at or below t
            start = np.minimum(start, np.where(alive, np.where(falling, 0, e), width))
            stop = np.maximum(stop, np.where(alive & falling, e, alive * width))
        return start, np.maximum(stop, start)  # no row alive (NaN): no column

    def _column_by_column(
        self,
        group: tuple[int, int],
        index: np.ndarray,
        by: np.ndarray,
        left: np.ndarray,
        count: np.ndarray,
        corners: list[np.ndarray],
        cut: np.ndarray,
    ) -> Iterator[ColumnRuns]:
        """Runs down columns left[k] .. left[k] + count[k] - 1 of tiles k.

        PIL's horizontal pass at each column, then the crossing of its two source
        rows' values; columns where that is not sure, row by row.
        """
        assert self._search is not None
        rows, cols = self._search
        a00, a01, a10, a11 = corners
        tile, x = expand_ranges(np.arange(len(index)), left, count)
        w0, w1 = cols.w0[x], cols.w1[x]
        low = np.empty(len(x), np.float32)
        high = np.empty(len(x), np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # inf · 0 in padded taps
            np.add(a00[tile] * w0, a01[tile] * w1, out=low, casting="unsafe")
            np.add(a10[tile] * w0, a11[tile] * w1, out=high, casting="unsafe")
        column_cut = cut[tile]
        height = rows.length[by][tile]
        inv_step, offset, margin, _ = _crossing_params(rows, by[tile])
        e, falling, sure = _crossing_at(low, high, column_cut, inv_step, offset, margin, height)
        first = np.where(falling, 0, e)
        stop = np.where(falling, e, height)
        if sure.all():
            yield ColumnRuns(group, index, by, tile, x, first, stop)
            return
        unsure = np.flatnonzero(~sure)
        first[unsure] = stop[unsure] = 0
        yield ColumnRuns(group, index, by, tile, x, first, stop)
        # Row by row, in PIL's arithmetic.
        band = by[tile[unsure]]
        offsets = np.arange(int(rows.length[band].max()))
        inside = offsets < rows.length[band][:, None]
        y = rows.start[band][:, None] + np.where(inside, offsets, 0)
        with np.errstate(invalid="ignore"):
            value = (low[unsure, None].astype(np.float64) * rows.w0[y]
                     + high[unsure, None].astype(np.float64) * rows.w1[y])
        hit, row = np.nonzero((value > column_cut[unsure, None]) & inside)
        unsure = unsure[hit]
        y = y[hit, row] - rows.start[band[hit]]
        yield ColumnRuns(group, index, by, tile[unsure], x[unsure], y, y + 1)

    def _generic_runs(self, maps: np.ndarray, thresholds: np.ndarray) -> Iterator[PixelRuns]:
        """`runs_above` for any axes, tile pattern by tile pattern."""
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
