from __future__ import annotations

from services.toyworld.captions import caption, concept_names, phrases
from services.toyworld.layout import ImageSpec, ShapeSpec, TextureSpec

SPEC = ImageSpec(
    background="green",
    pattern_color="white",
    texture=TextureSpec("dots", period=0.15),
    shapes=(
        ShapeSpec("circle", "red", 0.3, 0.3, 0.2, small=False),
        ShapeSpec("square", "blue", 0.7, 0.7, 0.1, small=True),
    ),
)


def test_caption() -> None:
    assert caption(SPEC) == "a red circle and a small blue square on a dotted green background"


def test_concept_names_and_phrases() -> None:
    assert concept_names(SPEC) == [
        "green", "white", "red", "blue", "dots", "green tiled", "circle", "square"
    ]
    found = phrases(SPEC)
    assert caption(SPEC) in found
    assert {"a red shape", "red circle", "a small blue square", "a dotted background"} <= set(found)
    assert {"white dots", "a green background with white dots"} <= set(found)
    assert "blue" not in found  # a bare colour word only ever names the background
