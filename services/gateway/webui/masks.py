"""Masks shown on the unit page: the unit's, a concept's and a formula's, at image resolution.

- `unit_mask`: NetDissect's visualisation: the raw map resized to the image with
  PIL's bilinear filter (what NetDissect-Lite resizes with), then thresholded at the
  unit's NetDissect threshold.
- `label_mask`: where a set of label numbers covers the image, from the stored
  label planes (mask resolution) scaled with nearest neighbour; an image-level label
  covers the whole image.
- `formula_mask`: a compositional formula (`(water OR river) AND NOT blue`, as the
  explainer prints it: precedence NOT > AND > OR, left-associative, consecutive bare
  words one name, names with spaces or keywords in JSON quotes) evaluated on label masks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
from PIL import Image

_TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|([^()"\s]+))')
_KEYWORDS = ("AND", "OR", "NOT")
# Operators of spatial formulas (specs/compositional_spatial.md): read, never drawn.
_SPATIAL = ("WITH", "CLOSE", "TO")


def unit_mask(raw: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 raw map -> (H, W) bool: bilinear resize to `size` (H, W), then > threshold."""
    height, width = size
    resized = Image.fromarray(np.ascontiguousarray(raw, dtype=np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized) > threshold


def label_mask(
    pixel: np.ndarray, image: np.ndarray, numbers: set[int], size: tuple[int, int]
) -> np.ndarray:
    """(H, W) bool: pixels covered by any of `numbers`.

    `pixel` is one image's (P, sh, sw) int32 label planes, `image` its (Q,) int32
    image-level labels (padded with 0).
    """
    height, width = size
    wanted = np.fromiter(numbers, dtype=np.int64) if numbers else np.zeros(0, np.int64)
    if np.isin(image, wanted).any():
        return np.ones(size, dtype=bool)
    small = np.isin(pixel, wanted).any(axis=0)
    resized = Image.fromarray(small.astype(np.uint8) * 255).resize(
        (width, height), Image.Resampling.NEAREST
    )
    return np.asarray(resized) > 0


def _tokens(text: str) -> list[tuple[str, str]]:
    """('(' | ')' | 'op' | 'name', text) tokens; consecutive bare words join into one name."""
    out: list[tuple[str, str]] = []
    bare = False  # the last token is a name of bare words, which the next bare word extends
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() != position:
            break
        position = match.end()
        opening, closing, quoted, word = match.groups()
        if opening or closing:
            out.append((opening or closing, opening or closing))
        elif quoted:
            out.append(("name", json.loads(quoted)))
        elif word in _KEYWORDS or word in _SPATIAL:
            out.append(("op", word))
        elif bare:
            out[-1] = ("name", f"{out[-1][1]} {word}")
        else:
            out.append(("name", word))
        bare = bool(word) and word not in _KEYWORDS and word not in _SPATIAL
    if text[position:].strip():
        raise ValueError(f"cannot read formula {text!r} at {text[position:]!r}")
    return out


def formula_mask(
    formula: str, leaf: Callable[[str], np.ndarray]
) -> np.ndarray:
    """Evaluate a printed formula with `leaf(name) -> (H, W) bool` for each label name."""
    tokens = _tokens(formula)
    position = 0

    def peek() -> tuple[str, str] | None:
        return tokens[position] if position < len(tokens) else None

    def take(kind: str) -> str:
        nonlocal position
        token = peek()
        if token is None or token[0] != kind:
            raise ValueError(f"cannot read formula {formula!r}: expected {kind}")
        position += 1
        return token[1]

    def disjunction() -> np.ndarray:
        mask = conjunction()
        while peek() == ("op", "OR"):
            take("op")
            mask = mask | conjunction()
        return mask

    def conjunction() -> np.ndarray:
        mask = negation()
        while peek() == ("op", "AND"):
            take("op")
            mask = mask & negation()
        return mask

    def negation() -> np.ndarray:
        if peek() == ("op", "NOT"):
            take("op")
            return ~negation()
        if peek() == ("(", "("):
            take("(")
            mask = disjunction()
            take(")")
            return mask
        return leaf(take("name"))

    mask = disjunction()
    if position != len(tokens):
        raise ValueError(f"cannot read formula {formula!r}: trailing {tokens[position][1]!r}")
    return mask


def is_logical_formula(formula: str) -> bool:
    """Tell whether `formula` reads as labels joined by AND, OR and NOT (what is drawn)."""
    try:
        formula_mask(formula, lambda name: np.zeros(1, dtype=bool))
    except ValueError:
        return False
    return True
