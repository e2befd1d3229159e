"""Spatial compositional formulas: operators, printing and parsing, ImRoU scores, beam search.

Follows specs/compositional_spatial.md (reference: Harth 2022, rafaelharth/indres, a
fork of jayelm/compexp). Masks are `spatial_masks` bitboards on the unit's
activation grid: (N, W) uint64 per formula, N images.

A formula is a primitive (a label, or its expansion `label-X`), `NOT f`, an n-ary
AND or OR (flattened: `(A AND NOT B) AND NOT C` is `A AND NOT (B OR C)`), or one of
the spatial operators:

- `A WITH B`: A in the images where B is non-empty anywhere, empty elsewhere;
- `A CLOSE TO B`: the cells of A with a B cell within distance √5; `A CLOSE TO (B1 & B2)`
  needs every Bi close (it is `(A CLOSE TO B1) CLOSE TO B2`);
- `A CLOSE B` = (A CLOSE TO B) OR (B CLOSE TO A).

Scores of a formula F against the unit's mask M_u, P cells per image, n_i = |M_u|
and l_i = |F| in image i, I = Σ |M_u ∩ F|, U = Σn + Σl − I:
IoU = I / U; ImRoU_r = (I − (r/P)·Σ n_i·l_i) / U; imroun = ImRoU_r divided by its
value at F = M_u, (Σn − (r/P)·Σn²) / Σn.

Length = number of leaves (primitives).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import numpy as np

from services.common.formula_text import EXPANDED, FormulaParser, Token, tokenize
from services.common.spec_vocabulary import (
    ABORT_FRACTION,
    ABORT_IMAGES,
    BEAM,
    DEFAULT_FORMULA_SCORE,
    DEFAULT_OPERATOR_SET,
    FORMULA_LENGTH,
    FORMULA_SCORES,
    IMROU_R,
    LENGTH_PENALTY,
    LINEAR_LENGTH_PENALTY,
    MIN_COVERAGE,
    OPERATOR_SETS,
    FormulaScore,
    OperatorSet,
)
from services.explainer.compositional import quote_label, string_literal
from services.explainer.spatial_masks import Grid, nonempty, popcount


@dataclass(frozen=True)
class Primitive:
    """A label's grid mask, or its one-step expansion (`label-X`) when `expanded`."""

    label: int
    expanded: bool = False


@dataclass(frozen=True)
class Not:
    """The complement over every cell of every image."""

    operand: Formula


@dataclass(frozen=True)
class And:
    """Every operand (two or more, none an And)."""

    operands: tuple[Formula, ...]


@dataclass(frozen=True)
class Or:
    """Any operand (two or more, none an Or)."""

    operands: tuple[Formula, ...]


@dataclass(frozen=True)
class With:
    """`left` in the images where `right` is non-empty."""

    left: Formula
    right: Formula


@dataclass(frozen=True)
class CloseTo:
    """The cells of `left` with a cell of every target within distance √5."""

    left: Formula
    targets: tuple[Formula, ...]


@dataclass(frozen=True)
class Close:
    """(left CLOSE TO right) OR (right CLOSE TO left)."""

    left: Formula
    right: Formula


Formula = Union[Primitive, Not, And, Or, With, CloseTo, Close]  # noqa: UP007 (runtime alias)
Spatial = (With, CloseTo, Close)


def disjoin(left: Formula, right: Formula) -> Or:
    """`left OR right`, flattened."""
    return Or(_flat(left, Or) + _flat(right, Or))


def conjoin(left: Formula, right: Formula) -> And:
    """`left AND right`, flattened."""
    return And(_flat(left, And) + _flat(right, And))


def and_not(left: Formula, right: Formula) -> And:
    """`left AND NOT right`; a negated operand of `left` absorbs `right` by OR."""
    if isinstance(left, And):
        for k, operand in enumerate(left.operands):
            if isinstance(operand, Not):
                merged = Not(disjoin(operand.operand, right))
                return And((*left.operands[:k], merged, *left.operands[k + 1:]))
    return conjoin(left, Not(right))


def close_to(left: Formula, right: Formula) -> CloseTo:
    """`left CLOSE TO right`; `(A CLOSE TO B) CLOSE TO C` is `A CLOSE TO (B & C)`."""
    if isinstance(left, CloseTo):
        return CloseTo(left.left, (*left.targets, right))
    return CloseTo(left, (right,))


def _flat(formula: Formula, kind: type[And] | type[Or]) -> tuple[Formula, ...]:
    return formula.operands if isinstance(formula, kind) else (formula,)


def primitives(formula: Formula) -> list[Primitive]:
    """The formula's leaves, left to right; its length is their number."""
    if isinstance(formula, Primitive):
        return [formula]
    return [p for child in _children(formula) for p in primitives(child)]


def _children(formula: Formula) -> tuple[Formula, ...]:
    if isinstance(formula, Primitive):
        return ()
    if isinstance(formula, Not):
        return (formula.operand,)
    if isinstance(formula, And | Or):
        return formula.operands
    if isinstance(formula, CloseTo):
        return (formula.left, *formula.targets)
    return (formula.left, formula.right)


def canonical_key(formula: Formula) -> object:
    """A key equal for formulas equal up to the order of commutative operands."""
    return _checked_key(formula, check=False)


def well_formed(formula: Formula) -> bool:
    """No `A op A` and no repeated operand under one AND, OR or target list."""
    return _checked_key(formula, check=True) is not None


def _checked_key(formula: Formula, check: bool) -> object | None:
    """`canonical_key`, or None when `check` finds two equal operands of one node."""
    if isinstance(formula, Primitive):
        return (formula.label, formula.expanded)
    keys = [_checked_key(child, check) for child in _children(formula)]
    if check and (None in keys or len(set(keys)) < len(keys)):
        return None
    if isinstance(formula, Not):
        return ("NOT", keys[0])
    if isinstance(formula, And | Or):
        return (type(formula).__name__, frozenset(keys))
    if isinstance(formula, CloseTo):
        return ("CLOSE TO", keys[0], frozenset(keys[1:]))
    if isinstance(formula, Close):
        return ("CLOSE", frozenset(keys))
    return ("WITH", keys[0], keys[1])


# -- printing and parsing ------------------------------------------------------------------

_KEYWORDS = ("AND", "OR", "NOT", "WITH", "CLOSE", "TO")


def format_formula(formula: Formula, names: Mapping[int, str]) -> str:
    """Print with label names, e.g. `(A OR B-X) CLOSE TO C`, `A AND NOT (B OR C)`.

    Operands of AND and OR that are other operations, and compound operands of NOT
    and of the spatial operators, are parenthesised; several CLOSE TO targets print
    as `(B1 & B2)`. Odd names (keywords, parentheses, quotes, `&`, a `-X` ending,
    stray spaces) are written as JSON strings.
    """
    if isinstance(formula, Primitive):
        return _quote(names[formula.label]) + (EXPANDED if formula.expanded else "")
    if isinstance(formula, Not):
        return f"NOT {_operand(formula.operand, names)}"
    if isinstance(formula, And | Or):
        word = " AND " if isinstance(formula, And) else " OR "
        return word.join(
            format_formula(o, names) if isinstance(o, Primitive | Not) else _operand(o, names)
            for o in formula.operands
        )
    left = _operand(formula.left, names)
    if isinstance(formula, CloseTo):
        if len(formula.targets) == 1:
            return f"{left} CLOSE TO {_operand(formula.targets[0], names)}"
        return f"{left} CLOSE TO ({' & '.join(_operand(t, names) for t in formula.targets)})"
    word = "WITH" if isinstance(formula, With) else "CLOSE"
    return f"{left} {word} {_operand(formula.right, names)}"


def _operand(formula: Formula, names: Mapping[int, str]) -> str:
    text = format_formula(formula, names)
    return text if isinstance(formula, Primitive) else f"({text})"


def _quote(name: str) -> str:
    text = quote_label(name, _KEYWORDS, "()&")
    # A bare name ending in -X would read back as an expansion.
    return string_literal(name) if text == name and name.endswith(EXPANDED) else text


def parse_formula(text: str, numbers: Mapping[str, int]) -> Formula:
    """Parse `format_formula`'s output back into a formula; ValueError if malformed.

    Precedence NOT > AND > OR > the spatial operators (left-associative); consecutive
    bare words form one name, a trailing `-X` marks an expansion; `numbers` maps
    names to label numbers.
    """
    return _Parser(tokenize(text, _KEYWORDS, "()&"), text, numbers).parse()


class _Parser(FormulaParser[Formula]):
    """The boolean grammar (flattening AND/OR) under the spatial operators, loosest first."""

    expansions = True

    def __init__(self, tokens: list[Token], text: str, numbers: Mapping[str, int]) -> None:
        super().__init__(tokens, text)
        self.numbers = numbers

    def either(self, left: Formula, right: Formula) -> Formula:
        return disjoin(left, right)

    def both(self, left: Formula, right: Formula) -> Formula:
        return conjoin(left, right)

    def negated(self, operand: Formula) -> Formula:
        return Not(operand)

    def label(self, name: str, expanded: bool) -> Formula:
        if name not in self.numbers:
            raise self.unknown(name)
        return Primitive(self.numbers[name], expanded)

    def top(self) -> Formula:
        formula = self.disjunction()
        while True:
            if self.take("op", "WITH"):
                formula = With(formula, self.disjunction())
            elif self.take("op", "CLOSE"):
                if self.take("op", "TO"):
                    for target in self.targets():
                        formula = close_to(formula, target)
                else:
                    formula = Close(formula, self.disjunction())
            else:
                return formula

    def targets(self) -> list[Formula]:
        """One operand, or a parenthesised `&` list of them."""
        start = self.at
        if self.take("("):
            listed = [self.top()]
            while self.take("&"):
                listed.append(self.top())
            if len(listed) > 1:
                self.closing()
                return listed
            self.at = start
        return [self.disjunction()]


# -- masks and scores ----------------------------------------------------------------------


def evaluate(formula: Formula, leaf: Callable[[Primitive], np.ndarray], grid: Grid) -> np.ndarray:
    """The formula's (N, W) uint64 bitboards; `leaf` gives each primitive's."""
    if isinstance(formula, Primitive):
        return leaf(formula)
    if isinstance(formula, Not):
        return grid.complement(evaluate(formula.operand, leaf, grid))
    if isinstance(formula, And | Or):
        masks = [evaluate(o, leaf, grid) for o in formula.operands]
        out = masks[0].copy()
        for mask in masks[1:]:
            out = out & mask if isinstance(formula, And) else out | mask
        return out
    return _spatial(formula, [evaluate(o, leaf, grid) for o in spatial_operands(formula)], grid)


def spatial_operands(formula: With | CloseTo | Close) -> tuple[Formula, ...]:
    """(left, right), or (left, *targets) of CLOSE TO."""
    if isinstance(formula, CloseTo):
        return (formula.left, *formula.targets)
    return (formula.left, formula.right)


def with_operands(formula: With | CloseTo | Close, operands: tuple[Formula, ...]) -> Formula:
    """The spatial formula of the same operator over `operands` (`spatial_operands`' order)."""
    if isinstance(formula, CloseTo):
        return CloseTo(operands[0], operands[1:])
    return type(formula)(operands[0], operands[1])


def _spatial(formula: With | CloseTo | Close, masks: Sequence[np.ndarray], grid: Grid
             ) -> np.ndarray:
    """The operator of `formula` over its operands' (..., N, W) masks (broadcast)."""
    left = masks[0]
    if isinstance(formula, CloseTo):
        for target in masks[1:]:
            left = left & grid.neighbourhood(target)
        return left
    right = masks[1]
    if isinstance(formula, With):
        return left * nonempty(right)[..., None]
    return (left & grid.neighbourhood(right)) | (right & grid.neighbourhood(left))


@dataclass(frozen=True)
class Scores:
    """IoU, ImRoU_r and imroun of K formulas, three (K,) float64, and their (K,) int64 areas."""

    iou: np.ndarray
    imrou: np.ndarray
    imroun: np.ndarray
    area: np.ndarray

    def of(self, score: FormulaScore) -> np.ndarray:
        """The (K,) scores a search ranks by."""
        return self.iou if score == "iou" else self.imroun


@dataclass(frozen=True)
class UnitMask:
    """The unit's thresholded map: bitboards (N, W) uint64, n_i (N,) int64, and its sums."""

    bits: np.ndarray
    cells: int  # P per image
    r: float = IMROU_R.default

    @cached_property
    def counts(self) -> np.ndarray:
        """(N,) int64 n_i."""
        return popcount(self.bits)

    @cached_property
    def total(self) -> int:
        """Σ n_i."""
        return int(self.counts.sum())

    @cached_property
    def normaliser(self) -> float:
        """ImRoU_r at F = M_u: (Σn − (r/P)·Σn²) / Σn (0 for a unit that never fires)."""
        n = self.counts
        total = int(n.sum())
        return (total - self.r / self.cells * float(n @ n)) / total if total else 0.0


def score_masks(
    unit: UnitMask, masks: np.ndarray, images: np.ndarray | None = None,
    unit_total: int | None = None,
) -> Scores:
    """Scores of (K, m, W) uint64 formula masks on images `images` (m,), all N when None.

    The formulas are empty on every other image, so these are their scores over the
    whole probe set; `unit_total` replaces Σ n_i to score within a prefix of the images
    (the early abort's).
    """
    bits = unit.bits if images is None else unit.bits[images]
    n = unit.counts if images is None else unit.counts[images]
    fire = np.flatnonzero(n)  # only images where the unit fires meet it
    on_fire = masks[:, fire]
    area = np.bitwise_count(masks).sum(axis=(1, 2), dtype=np.int64)  # Σ l_i
    inside = np.bitwise_count(on_fire & bits[fire]).sum(axis=(1, 2), dtype=np.int64)
    weighted = np.bitwise_count(on_fire).sum(axis=2, dtype=np.int64) @ n[fire]  # Σ n_i·l_i
    union = (unit.total if unit_total is None else unit_total) + area - inside
    safe = np.maximum(union, 1)
    iou = np.where(union > 0, inside / safe, 0.0)
    imrou = np.where(union > 0, (inside - unit.r / unit.cells * weighted) / safe, 0.0)
    normaliser = unit.normaliser
    imroun = imrou / normaliser if normaliser > 0 else np.zeros_like(imrou)
    return Scores(iou, imrou, imroun, area)


# -- beam search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialSearch:
    """Beam search settings (spec defaults outside the `indres` preset)."""

    beam: int = BEAM.default
    max_length: int = FORMULA_LENGTH.default
    top_k: int | None = None  # candidate primitives: the top_k by score, None = all
    score: FormulaScore = DEFAULT_FORMULA_SCORE
    r: float = IMROU_R.default
    operators: OperatorSet = DEFAULT_OPERATOR_SET
    length_penalty: float = LENGTH_PENALTY.default  # power form: rank = score · p^(length − 1)
    # The reference's form: rank = score · (1 − c·(length − 1)).
    linear_length_penalty: float = LINEAR_LENGTH_PENALTY.default
    min_coverage: float = MIN_COVERAGE.default  # skip formulas on fewer than this of all cells
    abort_images: int = ABORT_IMAGES.default  # spatial candidates are first scored on these …
    abort_fraction: float = ABORT_FRACTION.default  # … dropped below this × the worst in the beam

    def __post_init__(self) -> None:
        if self.beam < 1 or self.max_length < 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"beam, max_length and top_k must be positive: {self}")
        if self.score not in FORMULA_SCORES or self.operators not in OPERATOR_SETS:
            raise ValueError(
                f"score must be one of {FORMULA_SCORES}, operators one of {OPERATOR_SETS}"
            )

    def penalty(self, length: int) -> float:
        """The factor of both length penalty forms at `length` leaves."""
        return self.length_penalty ** (length - 1) * (1 - self.linear_length_penalty * (length - 1))


@dataclass(frozen=True)
class SpatialExplanation:
    """The best formula of one unit (None when no candidate covers enough cells)."""

    formula: Formula | None
    iou: float
    imrou: float
    imroun: float

    @property
    def length(self) -> int:
        """Number of leaves (0 without a formula)."""
        return 0 if self.formula is None else len(primitives(self.formula))


@dataclass(frozen=True)
class _Scored:
    formula: Formula
    rows: np.ndarray  # (m,) the images where the formula can be non-empty
    on_rows: np.ndarray  # (m, W) uint64 its mask there
    length: int
    iou: float
    imrou: float
    imroun: float
    score: float
    rank: float

    def mask(self, n_images: int) -> np.ndarray:
        """(N, W) uint64: the whole mask (made only for beam formulas that are extended)."""
        out = np.zeros((n_images, self.on_rows.shape[-1]), dtype=np.uint64)
        out[self.rows] = self.on_rows
        return out


@dataclass(frozen=True)
class _Candidates:
    """The candidates on images `rows` (m,), where a batch of extensions can be non-empty.

    (K, m, W) uint64 masks and neighbourhoods; (K, m, 1) uint64 1 where an image holds
    the candidate.
    """

    rows: np.ndarray
    masks: np.ndarray
    near: np.ndarray
    present: np.ndarray

    @classmethod
    def on(cls, rows: np.ndarray, masks: np.ndarray, near: np.ndarray) -> _Candidates:
        """Restrict (K, N, W) `masks` and `near` to images `rows`."""
        on_rows = masks[:, rows]
        return cls(rows, on_rows, near[:, rows], nonempty(on_rows)[..., None].astype(np.uint64))


# A batch of extensions of one beam formula by every candidate: (candidate indices, a
# slice of the batch's images) -> (k, m, W) masks; the formula of candidate i; whether it
# is spatial; the batch's images (`_Candidates`; the formulas are empty on all others).
_Batch = tuple[
    Callable[[np.ndarray, slice], np.ndarray], Callable[[int], Formula], bool, _Candidates
]


def explain_unit(
    unit: UnitMask,
    candidates: Sequence[Primitive],
    masks: np.ndarray,
    grid: Grid,
    settings: SpatialSearch = SpatialSearch(),
) -> SpatialExplanation:
    """Beam-search the best formula of `candidates` ((K, N, W) uint64 `masks`) for `unit`."""
    n_images = masks.shape[1]
    min_cells = settings.min_coverage * n_images * grid.cells
    scores = score_masks(unit, masks)
    primary = scores.of(settings.score)
    usable = np.flatnonzero(scores.area >= min_cells)
    order = usable[np.lexsort((usable, -primary[usable]))]
    if settings.top_k is not None:
        order = order[: settings.top_k]
    chosen = np.sort(order)
    prims = [candidates[i] for i in chosen]
    prim_masks = masks[chosen]
    index = {p: k for k, p in enumerate(prims)}
    near = grid.neighbourhood(prim_masks)
    every = _Candidates(np.arange(n_images), prim_masks, near,
                        nonempty(prim_masks)[..., None].astype(np.uint64))

    def leaf(p: Primitive) -> np.ndarray:
        return prim_masks[index[p]]

    def scored(
        formula: Formula, rows: np.ndarray, on_rows: np.ndarray, length: int, k: int, s: Scores
    ) -> _Scored:
        value = float(s.of(settings.score)[k])
        return _Scored(formula, rows, on_rows, length, float(s.iou[k]), float(s.imrou[k]),
                       float(s.imroun[k]), value, value * settings.penalty(length))

    beam = _best(
        [scored(p, every.rows, prim_masks[k], 1, int(i), scores) for k, (p, i) in enumerate(
            zip(prims, chosen, strict=True))],
        settings.beam,
    )
    everything = np.arange(len(prims))
    prefix_total = int(unit.counts[: settings.abort_images].sum())
    for length in range(2, settings.max_length + 1):
        pool = list(beam)
        seen = {canonical_key(s.formula) for s in pool}
        worst = beam[-1].score if len(beam) == settings.beam else None
        # The best `beam` ranks in the pool (a min-heap): a candidate ranked no higher than
        # the lowest of them once there are `beam` can never enter the beam (ties keep the
        # earlier formula), so a segment stops there.
        best_ranks = sorted(s.rank for s in pool)[-settings.beam :]
        for parent in beam:
            # Extensions on the same images are scored in one pass, a segment per operation.
            groups: dict[int, list[tuple[Callable[[int], Formula], np.ndarray, np.ndarray]]] = {}
            on: dict[int, _Candidates] = {}
            for make, build, spatial, where in _extensions(
                parent.formula, parent.mask(n_images), every, near, prims, leaf, grid,
                settings.operators,
            ):
                kept = everything
                head = int(np.searchsorted(where.rows, settings.abort_images))
                if (spatial and worst is not None and worst > 0 and settings.abort_fraction > 0
                        and head < len(where.rows)):
                    prefix = make(kept, slice(0, head))
                    early = score_masks(unit, prefix, where.rows[:head], prefix_total)
                    kept = kept[early.of(settings.score) >= settings.abort_fraction * worst]
                groups.setdefault(id(where), []).append((build, kept, make(kept, slice(None))))
                on[id(where)] = where
            for group, segments in groups.items():
                rows = on[group].rows
                batch = np.concatenate([m for _, _, m in segments])
                batch_scores = score_masks(unit, batch, rows)
                rank = batch_scores.of(settings.score) * settings.penalty(length)
                ranks = rank.tolist()
                covered = (batch_scores.area >= min_cells).tolist()
                offset = 0
                for build, kept, _ in segments:
                    added = 0
                    order = np.lexsort((kept, -rank[offset : offset + len(kept)])).tolist()
                    numbers = kept.tolist()
                    for j in order:
                        full = len(best_ranks) == settings.beam
                        if added == settings.beam or (full and ranks[offset + j] <= best_ranks[0]):
                            break
                        if not covered[offset + j]:
                            continue
                        formula = build(numbers[j])
                        key = _checked_key(formula, check=True)
                        if key is None or key in seen:
                            continue
                        seen.add(key)
                        k = offset + j
                        pool.append(scored(formula, rows, batch[k], length, k, batch_scores))
                        if full:
                            heapq.heapreplace(best_ranks, ranks[k])
                        else:
                            heapq.heappush(best_ranks, ranks[k])
                        added += 1
                    offset += len(kept)
        beam = _best(pool, settings.beam)
    if not beam:
        return SpatialExplanation(None, 0.0, 0.0, 0.0)
    top = beam[0]
    return SpatialExplanation(top.formula, top.iou, top.imrou, top.imroun)


def _extensions(
    f: Formula,
    f_mask: np.ndarray,
    every: _Candidates,
    near: np.ndarray,
    prims: Sequence[Primitive],
    leaf: Callable[[Primitive], np.ndarray],
    grid: Grid,
    operators: OperatorSet,
) -> Iterator[_Batch]:
    """Every operation extending `f` ((N, W) mask `f_mask`) by one candidate, as batches.

    `every` holds the candidates on all images, `near` (K, N, W) their neighbourhoods.
    OR needs every image; every other operation is empty where `f` is.
    """
    yield (
        lambda i, sub: f_mask[sub] | every.masks[i, sub],
        lambda i: disjoin(f, prims[i]),
        False,
        every,
    )
    mine = _Candidates.on(np.flatnonzero(nonempty(f_mask)), every.masks, near)
    fm = f_mask[mine.rows]
    yield (
        lambda i, sub: fm[sub] & mine.masks[i, sub], lambda i: conjoin(f, prims[i]), False, mine
    )
    yield (
        lambda i, sub: fm[sub] & grid.complement(mine.masks[i, sub]),
        lambda i: and_not(f, prims[i]),
        False,
        mine,
    )
    if operators == "boolean":
        return
    f_near = grid.neighbourhood(fm)
    yield (lambda i, sub: fm[sub] * mine.present[i, sub]), (lambda i: With(f, prims[i])), True, mine
    yield (lambda i, sub: mine.masks[i, sub]), (lambda i: With(prims[i], f)), True, mine
    yield (
        lambda i, sub: fm[sub] & mine.near[i, sub], lambda i: close_to(f, prims[i]), True, mine
    )
    yield (
        lambda i, sub: mine.masks[i, sub] & f_near[sub],
        lambda i: close_to(prims[i], f),
        True,
        mine,
    )
    yield (
        lambda i, sub: (fm[sub] & mine.near[i, sub]) | (mine.masks[i, sub] & f_near[sub]),
        lambda i: Close(f, prims[i]),
        True,
        mine,
    )
    if isinstance(f, Spatial):
        yield from _pushed(f, every, near, prims, leaf, grid)


def _pushed(
    f: With | CloseTo | Close,
    every: _Candidates,
    near: np.ndarray,
    prims: Sequence[Primitive],
    leaf: Callable[[Primitive], np.ndarray],
    grid: Grid,
) -> Iterator[_Batch]:
    """OR and AND NOT of a candidate pushed into each operand of a spatial formula.

    The result is empty in images where any other operand is.
    """
    operands = spatial_operands(f)
    operand_masks = [evaluate(o, leaf, grid) for o in operands]
    held = [nonempty(m) for m in operand_masks]
    for k, side in enumerate(operands):
        others = [h for j, h in enumerate(held) if j != k]
        where = _Candidates.on(np.flatnonzero(np.logical_and.reduce(others)), every.masks, near)
        on_rows = [m[where.rows] for m in operand_masks]
        for combine, join in (
            (lambda a, b: a | b, disjoin),
            (lambda a, b: a & grid.complement(b), and_not),
        ):

            def make(
                i: np.ndarray, sub: slice, k: int = k, combine: _Combine = combine,
                on_rows: list[np.ndarray] = on_rows, where: _Candidates = where,
            ) -> np.ndarray:
                masks = [m[sub] for m in on_rows]
                masks[k] = combine(masks[k], where.masks[i, sub])
                return _spatial(f, masks, grid)

            def build(i: int, k: int = k, side: Formula = side, join: _Join = join) -> Formula:
                return with_operands(f, (*operands[:k], join(side, prims[i]), *operands[k + 1:]))

            yield make, build, True, where


_Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]
_Join = Callable[[Formula, Formula], Formula]


def _best(pool: list[_Scored], beam: int) -> list[_Scored]:
    """The `beam` best by rank; the stable sort keeps ties in generation order."""
    return sorted(pool, key=lambda s: -s.rank)[:beam]
