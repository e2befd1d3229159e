"""Compositional explanations: the best logical formula of labels for each unit.

Follows specs/compositional.md (reference: Mu & Andreas 2020, jayelm/compexp).

A formula is `Leaf(label)`, `Not(f)`, `And(f, g)` or `Or(f, g)`; its mask is the
pixelwise boolean combination of dataset-wide label masks at mask resolution, an
image-level label covering its whole image and NOT complementing over every pixel
of every probe image. Score: IoU(M_u, mask(F)) with Σ|M_u| over all images (mode
`all` of Network Dissection). Length = number of leaves.

Masks are never materialised. Every pixel has a *label set* (`unit_masks`), and a
formula's truth at a pixel depends only on that set, so counts over pixels are
counts over label sets. Two tables of label sets with pixel counts describe a
unit completely: the dataset's (every pixel of every image, unlabeled pixels as
the empty set, so NOT is exact) and the unit's (only its mask pixels, gathered
from the images where it fires). A formula's indicator is a polynomial in its
leaves (a OR b = a + b - ab, NOT a = 1 - a), so

    |F ∩ l| = Σ_S coef_S · |(∩_{s ∈ S} s) ∩ l|

and one co-occurrence vector per monomial S, over the sets holding all of S,
scores F OR l, F AND l and F AND NOT l for every label l at once.

Beam search (left-deep): start from the labels; from each beam formula F and each
candidate label l try F OR l, F AND l, F AND NOT l; the beam is the best `beam`
formulas of the old beam plus the new candidates (older, shorter formulas stay
eligible). Order: rank = IoU · length_penalty^(length - 1) descending, ties in
the order of generation: the old beam first (so shorter formulas win ties), then
per beam formula OR, AND, AND NOT, each by ascending label number. Candidates that
cannot matter are never kept:

- formulas with no pixel in the unit's mask (IoU 0; no extension of them scores
  above a single label) — in particular leaves and ANDs with a label that never
  lies in the unit's mask, the spec's pruning: a label that never appears in an
  image where the unit fires has zero intersection;
- extensions whose mask equals their parent's (l ⊆ F for OR, F ⊆ l for AND, l
  disjoint from F for AND NOT), which would fill the beam with copies;
- a formula equal to one already in the pool up to commutativity and
  associativity of AND and OR.

A label absent from every image where the unit fires is still tried in F OR l and
F AND NOT l: there it changes |F| and the IoU (F AND NOT l can only gain), so
dropping it outright would change results.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from services.common.formula_text import FormulaParser, Token, tokenize
from services.common.probe_format import LabelChunk
from services.common.spec_vocabulary import BEAM, FORMULA_LENGTH, LENGTH_PENALTY
from services.explainer.unit_masks import (
    MaskCounts,
    canonical_rows,
    chunk_label_sets,
    count_masks,
    unique_rows,
)

# Co-occurrence vectors a table keeps (one per monomial met, e.g. 10 per unit searched).
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class Leaf:
    """The mask of one label."""

    label: int


@dataclass(frozen=True)
class Not:
    """The complement of a formula over every pixel of every probe image."""

    operand: Formula


@dataclass(frozen=True)
class And:
    """Both formulas."""

    left: Formula
    right: Formula


@dataclass(frozen=True)
class Or:
    """Either formula."""

    left: Formula
    right: Formula


Formula = Union[Leaf, Not, And, Or]  # noqa: UP007 (a runtime alias; `|` needs the classes)

_KEYWORDS = ("AND", "OR", "NOT")


def leaves(formula: Formula) -> list[int]:
    """Labels of the formula's leaves, left to right; its length is their number."""
    if isinstance(formula, Leaf):
        return [formula.label]
    if isinstance(formula, Not):
        return leaves(formula.operand)
    return leaves(formula.left) + leaves(formula.right)


def canonical_key(formula: Formula) -> tuple[object, ...]:
    """A key equal for formulas equal up to commutativity and associativity of AND, OR."""
    if isinstance(formula, Leaf):
        return ("leaf", formula.label)
    if isinstance(formula, Not):
        return ("not", canonical_key(formula.operand))
    kind = type(formula)
    operands: list[Formula] = []
    pending: list[Formula] = [formula]
    while pending:
        node = pending.pop()
        if isinstance(node, kind):
            pending += [node.left, node.right]
        else:
            operands.append(node)
    return (kind.__name__.lower(), tuple(sorted(canonical_key(o) for o in operands)))


def format_formula(formula: Formula, names: Mapping[int, str]) -> str:
    """Print with label names, e.g. `(water OR river) AND NOT blue`.

    AND and OR chains read left to right; an operand that is a different operation
    (or any right operand that is an operation) is parenthesised. Names that
    contain parentheses, quotes, keywords or stray spaces are written as JSON
    strings.
    """
    if isinstance(formula, Leaf):
        return quote_label(names[formula.label])
    if isinstance(formula, Not):
        inner = format_formula(formula.operand, names)
        return f"NOT ({inner})" if isinstance(formula.operand, And | Or) else f"NOT {inner}"
    word = "AND" if isinstance(formula, And) else "OR"
    left = format_formula(formula.left, names)
    if isinstance(formula.left, And | Or) and type(formula.left) is not type(formula):
        left = f"({left})"
    right = format_formula(formula.right, names)
    if isinstance(formula.right, And | Or):
        right = f"({right})"
    return f"{left} {word} {right}"


def quote_label(name: str, keywords: Sequence[str] = _KEYWORDS, reserved: str = "()") -> str:
    """A label name as a formula prints it: bare when it reads back as one name, else quoted.

    Bare: single spaces between words, no word a keyword, no quote, whitespace or
    `reserved` character; else a JSON string (`string_literal`).
    """
    words = name.split(" ")
    special = re.escape(reserved + '"')
    plain = (
        name
        and all(words)
        and not any(w.upper() in keywords for w in words)
        and re.fullmatch(rf"[^{special}\s]+( [^{special}\s]+)*", name)
    )
    return name if plain else string_literal(name)


def string_literal(name: str) -> str:
    """`name` in double quotes, backslash and quote escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_formula(text: str, numbers: Mapping[str, int]) -> Formula:
    """Parse `format_formula`'s output (or any such text) back into a formula.

    Precedence NOT > AND > OR, both binary operations left-associative; consecutive
    bare words form one label name; `numbers` maps names to label numbers. Raises
    ValueError on malformed text or an unknown name.
    """
    return _Parser(tokenize(text, _KEYWORDS, "()"), text, numbers).parse()


class _Parser(FormulaParser[Formula]):
    """The boolean grammar's nodes: Or, And, Not, Leaf."""

    def __init__(self, tokens: list[Token], text: str, numbers: Mapping[str, int]) -> None:
        super().__init__(tokens, text)
        self.numbers = numbers

    def either(self, left: Formula, right: Formula) -> Formula:
        return Or(left, right)

    def both(self, left: Formula, right: Formula) -> Formula:
        return And(left, right)

    def negated(self, operand: Formula) -> Formula:
        return Not(operand)

    def label(self, name: str, expanded: bool) -> Formula:
        if name not in self.numbers:
            raise self.unknown(name)
        return Leaf(self.numbers[name])


class LabelSetTable:
    """Pixel counts per label set, with the co-occurrence sums that score formulas.

    `rows` (A, K) int32 label sets (labels in descending order, 0-padded), `weight`
    (A,) int64 pixels per set, `n_labels` = L + 1 (label numbers are below it).
    """

    def __init__(self, rows: np.ndarray, weight: np.ndarray, n_labels: int) -> None:
        self.rows = rows
        self.weight = weight
        self.n_labels = n_labels
        flat = rows.reshape(-1)
        held = np.flatnonzero(flat)
        order = held[np.argsort(flat[held], kind="stable")]
        # Sets holding label l: self._sets[self._start[l]:self._start[l + 1]], ascending.
        self._sets = order // max(rows.shape[1], 1)
        self._start = np.searchsorted(flat[order], np.arange(n_labels + 1))
        self._cache: dict[frozenset[int], np.ndarray] = {}

    @classmethod
    def merge(
        cls, rows: Sequence[np.ndarray], weights: Sequence[np.ndarray], n_labels: int
    ) -> LabelSetTable:
        """Build one table from (A_i, K_i) rows and (A_i,) weights, adding equal sets."""
        width = max((r.shape[1] for r in rows), default=0)
        stacked = np.concatenate(
            [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
        ) if rows else np.zeros((0, 0), np.int32)
        distinct, index = unique_rows(canonical_rows(stacked.astype(np.int32)))
        weight = np.bincount(index, weights=np.concatenate(weights) if weights else None,
                             minlength=len(distinct))
        return cls(distinct, np.rint(weight).astype(np.int64), n_labels)

    def total(self) -> int:
        """Σ weight: every pixel the table describes."""
        return int(self.weight.sum())

    def sets_with(self, labels: frozenset[int]) -> np.ndarray:
        """Sorted indices of the sets holding every label in `labels` (all for ∅)."""
        found: np.ndarray | None = None
        for label in sorted(labels, key=lambda x: self._start[x + 1] - self._start[x]):
            sets = self._sets[self._start[label] : self._start[label + 1]]
            found = sets if found is None else np.intersect1d(found, sets, assume_unique=True)
        return np.arange(len(self.rows)) if found is None else found

    def size(self, labels: frozenset[int]) -> int:
        """Pixels whose set holds every label in `labels`."""
        return int(self.weight[self.sets_with(labels)].sum())

    def cooccurrence(self, labels: frozenset[int]) -> np.ndarray:
        """(L + 1,) int64: per label l, pixels whose set holds l and every label in `labels`."""
        if labels not in self._cache:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            sets = self.sets_with(labels)
            width = self.rows.shape[1]
            counts = np.bincount(
                self.rows[sets].reshape(-1),
                weights=np.repeat(self.weight[sets], width),
                minlength=self.n_labels,
            )
            counts[0] = 0
            self._cache[labels] = np.rint(counts).astype(np.int64)
        return self._cache[labels]


def dataset_label_sets(chunks: Iterable[LabelChunk], label_categories: np.ndarray) -> LabelSetTable:
    """The probe set's table: every pixel of every image, streamed over label chunks.

    Computed once per dataset and category selection; shared by every unit.
    """
    rows, weights = [], []
    for chunk in chunks:
        sets = chunk_label_sets(chunk, label_categories)
        rows.append(sets.rows)
        weights.append(sets.pixel_count)
    return LabelSetTable.merge(rows, weights, len(label_categories))


class UnitLabelSets:
    """Stream image chunks into per-unit tables of mask pixels per label set.

    `thresholds` (U,) float32 are the unit block's T_u (Network Dissection's),
    `label_categories` (L + 1,) int32 as in `IoUTally`.
    """

    def __init__(self, thresholds: np.ndarray, label_categories: np.ndarray) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.label_categories = np.asarray(label_categories, dtype=np.int32)
        self._units: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []

    def update(self, acts: np.ndarray, labels: LabelChunk) -> None:
        """Add one chunk: (n, U, h, w) float32 activations of images [labels.i0, labels.i1)."""
        self.add(count_masks(acts, labels, self.thresholds, self.label_categories))

    def add(self, counts: MaskCounts) -> None:
        """Add one chunk already thresholded by `count_masks` with these thresholds."""
        self._units.append(counts.pair_unit[counts.pair])
        self._rows.append(counts.sets.rows[counts.set])
        self._counts.append(counts.count)

    def tables(self) -> list[LabelSetTable]:
        """One table per unit of the block, in unit order."""
        n_labels = len(self.label_categories)
        width = max((r.shape[1] for r in self._rows), default=0)
        unit = np.concatenate(self._units) if self._units else np.zeros(0, np.int64)
        rows = np.concatenate(
            [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in self._rows]
        ) if self._rows else np.zeros((0, 0), np.int32)
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        order = np.argsort(unit, kind="stable")
        bounds = np.searchsorted(unit[order], np.arange(len(self.thresholds) + 1))
        return [
            LabelSetTable.merge([rows[order[a:b]]], [counts[order[a:b]]], n_labels)
            for a, b in itertools.pairwise(bounds)
        ]


@dataclass(frozen=True)
class SearchSettings:
    """Beam search parameters (spec defaults)."""

    beam: int = BEAM.default
    max_length: int = FORMULA_LENGTH.default  # leaves
    top_k: int | None = None  # candidate labels: the top_k by primitive IoU, None = all
    length_penalty: float = LENGTH_PENALTY.default  # rank = IoU · penalty^(length - 1)

    def __post_init__(self) -> None:
        if self.beam < 1 or self.max_length < 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"beam, max_length and top_k must be positive: {self}")
        if not self.length_penalty > 0:
            raise ValueError(f"length_penalty must be positive, got {self.length_penalty}")


@dataclass(frozen=True)
class Explanation:
    """The best formula found for one unit (None when its mask meets no label)."""

    formula: Formula | None
    iou: float
    intersection: int  # |M_u ∩ mask(F)|
    formula_area: int  # |mask(F)|
    mask_area: int  # |M_u|
    runners_up: tuple[tuple[Formula, float], ...] = ()  # the rest of the final beam, with IoUs

    @property
    def length(self) -> int:
        """Number of leaves (0 without a formula)."""
        return 0 if self.formula is None else len(leaves(self.formula))


@dataclass(frozen=True)
class _Scored:
    formula: Formula
    length: int
    intersection: int
    area: int
    iou: float
    rank: float


def _indicator(formula: Formula) -> dict[frozenset[int], int]:
    """The formula's indicator as a polynomial: monomial (set of labels) → coefficient."""
    if isinstance(formula, Leaf):
        return {frozenset([formula.label]): 1}
    if isinstance(formula, Not):
        return _plus({frozenset(): 1}, _indicator(formula.operand), -1)
    left, right = _indicator(formula.left), _indicator(formula.right)
    both = _times(left, right)
    return both if isinstance(formula, And) else _plus(_plus(left, right, 1), both, -1)


def _plus(a: dict[frozenset[int], int], b: dict[frozenset[int], int], sign: int) -> dict[
    frozenset[int], int
]:
    out = dict(a)
    for monomial, coef in b.items():
        out[monomial] = out.get(monomial, 0) + sign * coef
    return {m: c for m, c in out.items() if c}


def _times(a: dict[frozenset[int], int], b: dict[frozenset[int], int]) -> dict[
    frozenset[int], int
]:
    out: dict[frozenset[int], int] = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            out[ma | mb] = out.get(ma | mb, 0) + ca * cb  # x·x = x for indicators
    return {m: c for m, c in out.items() if c}


def _counts(table: LabelSetTable, polynomial: dict[frozenset[int], int]) -> tuple[int, np.ndarray]:
    """(|F|, (L + 1,) |F ∩ l|) over the table's pixels, F given by its polynomial."""
    area = 0
    overlap = np.zeros(table.n_labels, dtype=np.int64)
    for monomial, coef in polynomial.items():
        area += coef * (table.total() if not monomial else table.size(monomial))
        overlap += coef * table.cooccurrence(monomial)
    return area, overlap


def score_formula(formula: Formula, unit: LabelSetTable, dataset: LabelSetTable) -> Explanation:
    """Exact IoU of one formula with the unit's mask (mode `all`)."""
    polynomial = _indicator(formula)
    area, _ = _counts(dataset, polynomial)
    inside, _ = _counts(unit, polynomial)
    mask = unit.total()
    union = mask + area - inside
    return Explanation(formula, inside / union if union else 0.0, inside, area, mask)


def explain_unit(
    unit: LabelSetTable,
    dataset: LabelSetTable,
    candidates: np.ndarray,
    settings: SearchSettings = SearchSettings(),
) -> Explanation:
    """Beam-search the best formula for one unit over `candidates` (labels > 0).

    `unit` counts the unit's mask pixels per label set, `dataset` every pixel's.
    """
    labels = np.unique(np.asarray(candidates, dtype=np.int64))
    if len(labels) and (labels[0] < 1 or labels[-1] >= dataset.n_labels):
        raise ValueError(f"candidate labels must lie in [1, {dataset.n_labels - 1}]")
    mask = unit.total()
    label_area = dataset.cooccurrence(frozenset())
    label_inside = unit.cooccurrence(frozenset())
    primitive = _iou(label_inside[labels], mask + label_area[labels] - label_inside[labels])
    if settings.top_k is not None and settings.top_k < len(labels):
        labels = np.sort(labels[np.lexsort((labels, -primitive))[: settings.top_k]])
        primitive = _iou(label_inside[labels], mask + label_area[labels] - label_inside[labels])
    penalty = settings.length_penalty
    beam = [
        _Scored(Leaf(int(label)), 1, int(label_inside[label]), int(label_area[label]), score, score)
        for label, score in zip(labels.tolist(), primitive.tolist(), strict=True)
        if label_inside[label] > 0
    ]
    beam = _best(beam, settings.beam)
    for length in range(2, settings.max_length + 1):
        pool = list(beam)
        seen = {canonical_key(s.formula) for s in pool}
        for parent in beam:
            polynomial = _indicator(parent.formula)
            overlap = _counts(dataset, polynomial)[1]
            overlap_inside = _counts(unit, polynomial)[1]
            d, j = overlap[labels], overlap_inside[labels]
            a, b = label_area[labels], label_inside[labels]
            options = (
                (Or, parent.intersection + b - j, parent.area + a - d, d == a),
                (And, j, d, d == parent.area),
                (_and_not, parent.intersection - j, parent.area - d, d == 0),
            )
            for build, inside, area, same in options:
                score = _iou(inside, mask + area - inside)
                rank = score * penalty ** (length - 1)
                usable = np.flatnonzero((inside > 0) & ~same)
                # Only the best `beam` of one (parent, operation) can reach the beam.
                usable = usable[np.lexsort((usable, -rank[usable]))[: settings.beam]]
                for i in np.sort(usable):
                    formula = build(parent.formula, Leaf(int(labels[i])))
                    key = canonical_key(formula)
                    if key not in seen:
                        seen.add(key)
                        pool.append(_Scored(formula, length, int(inside[i]), int(area[i]),
                                            float(score[i]), float(rank[i])))
        beam = _best(pool, settings.beam)
    if not beam:
        return Explanation(None, 0.0, 0, 0, mask)
    top = beam[0]
    runners_up = tuple((s.formula, s.iou) for s in beam[1:])
    return Explanation(top.formula, top.iou, top.intersection, top.area, mask, runners_up)


def _and_not(left: Formula, right: Formula) -> Formula:
    return And(left, Not(right))


def _iou(inside: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Elementwise inside / union as float64, 0 where the union is empty."""
    return np.where(union > 0, inside / np.maximum(union, 1), 0.0)


def _best(pool: list[_Scored], beam: int) -> list[_Scored]:
    """The `beam` best by rank; the stable sort keeps ties in generation order."""
    return sorted(pool, key=lambda s: -s.rank)[:beam]


def explain_units(
    units: Sequence[LabelSetTable],
    dataset: LabelSetTable,
    candidates: np.ndarray,
    settings: SearchSettings = SearchSettings(),
) -> list[Explanation]:
    """`explain_unit` for each unit of a block; co-occurrences are shared across units."""
    return [explain_unit(u, dataset, candidates, settings) for u in units]
