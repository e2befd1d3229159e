"""Text about toy images: full captions, per-shape descriptions and short true phrases."""

from __future__ import annotations

from services.extractor.toyworld.layout import ImageSpec, ShapeSpec
from services.extractor.toyworld.world import WORLD


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


def phrases(spec: ImageSpec) -> list[str]:
    """Short phrases true of the image, from bare label names to the full caption.

    Used to train the tiny CLIP so that both captions and bare concept names (what
    CLIP-Dissect embeds) land near the images they describe.
    """
    texture = spec.texture.kind
    scene = WORLD.scenes[spec.scene]
    out = [caption(spec), describe_background(spec), spec.background, texture, scene]
    out += [f"a {WORLD.adjective(texture)} background", f"a {spec.background} background"]
    for shape in spec.shapes:
        out += [
            describe_shape(shape),
            shape.kind,
            f"a {shape.kind}",
            f"a {shape.color} shape",
            f"{shape.color} {shape.kind}",
        ]
    return out
