"""Masks shown on the unit page: the unit's, a concept's and a formula's, at image resolution.

- `unit_mask`: NetDissect's visualisation: the raw map resized to the image with
  PIL's bilinear filter (what NetDissect-Lite resizes with), then thresholded at the
  unit's NetDissect threshold.
- `label_mask`: where a set of label numbers covers the image, from the stored
  label planes (mask resolution) scaled with nearest neighbour; an image-level label
  covers the whole image.
- `formula_mask`: a compositional formula of the boolean mode (`(water OR river) AND
  NOT blue`, as the explainer prints it), read by the one formula parser
  (`services/common/formula_text.py`) and evaluated on label masks. Formulas of the
  spatial mode live on the activation grid (WITH, CLOSE TO, expansions): not drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from services.common.formula_text import FormulaParser, tokenize

_KEYWORDS = ("AND", "OR", "NOT")


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


class _MaskParser(FormulaParser[np.ndarray]):
    """The boolean grammar evaluated on masks: OR is |, AND is &, NOT is ~."""

    def __init__(self, text: str, leaf: Callable[[str], np.ndarray]) -> None:
        super().__init__(tokenize(text, _KEYWORDS, "()"), text)
        self.leaf = leaf

    def either(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return left | right

    def both(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return left & right

    def negated(self, operand: np.ndarray) -> np.ndarray:
        return ~operand

    def label(self, name: str, expanded: bool) -> np.ndarray:
        return self.leaf(name)


def formula_mask(formula: str, leaf: Callable[[str], np.ndarray]) -> np.ndarray:
    """Evaluate a printed formula with `leaf(name) -> (H, W) bool` for each label name."""
    return _MaskParser(formula, leaf).parse()


def is_logical_formula(formula: str) -> bool:
    """Tell whether `formula` reads as labels joined by AND, OR and NOT (what is drawn)."""
    try:
        formula_mask(formula, lambda name: np.zeros(1, dtype=bool))
    except ValueError:
        return False
    return True
