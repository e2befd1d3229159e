"""Text about toy images: full captions, per-shape descriptions and short true phrases."""

from __future__ import annotations

from services.toyworld.layout import ImageSpec, ShapeSpec
from services.toyworld.world import WORLD


def describe_shape(shape: ShapeSpec) -> str:
    """E.g. `a small blue square`, `a red circle`."""
    size = "small " if shape.small else ""
    return f"a {size}{shape.color} {shape.kind}"


def describe_background(spec: ImageSpec) -> str:
    """E.g. `a dotted green background`."""
    return f"a {WORLD.adjective(spec.texture.kind)} {spec.background} background"


def caption(spec: ImageSpec) -> str:
    """E.g. `a red circle and a small blue square on a dotted green background`."""
    parts = [describe_shape(s) for s in spec.shapes]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{things} on {describe_background(spec)}"


def colors_present(spec: ImageSpec) -> list[str]:
    """Every colour the image shows, once each: background, pattern (unless plain), shapes."""
    found = [spec.background]
    if spec.texture.kind != "plain":
        found.append(spec.pattern_color)
    return list(dict.fromkeys(found + [shape.color for shape in spec.shapes]))


def concept_names(spec: ImageSpec) -> list[str]:
    """Bare label names true of the image: colours present, texture, scene, shape kinds.

    A bare colour word names any colour the image shows, as the pixel-level colour labels
    do (white and black only ever appear as patterns and shapes); these are the raw
    concept strings CLIP-Dissect embeds.
    """
    names = [*colors_present(spec), spec.texture.kind, WORLD.scenes[spec.scene]]
    return names + [shape.kind for shape in spec.shapes]


def phrases(spec: ImageSpec) -> list[str]:
    """Descriptive phrases true of the image, from `a red shape` to the full caption."""
    texture = WORLD.adjective(spec.texture.kind)
    out = [caption(spec), describe_background(spec)]
    out += [f"a {texture} background", f"a {spec.background} background"]
    if spec.texture.kind != "plain":
        pattern = f"{spec.pattern_color} {spec.texture.kind}"
        out += [pattern, f"a {spec.background} background with {pattern}"]
    for shape in spec.shapes:
        out += [
            describe_shape(shape),
            f"a {shape.kind}",
            f"a {shape.color} shape",
            f"{shape.color} {shape.kind}",
        ]
    return out
