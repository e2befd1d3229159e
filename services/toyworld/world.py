"""What the toy world contains: colours, shapes, parts, textures, scenes and their label numbers.

Label numbers are global and dense from 1 (0 = unlabeled), in this order: colours, shapes,
parts, textures, scenes. The texture label `dots` is also an object label (the dots of a
dotted background are objects too), so one label has two categories and its primary
category (texture, coverage 1.0) is not the first one listed (object).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Label:
    """One label of the toy world, with every category it appears in."""

    number: int
    name: str
    categories: tuple[str, ...]


@dataclass(frozen=True)
class ToyWorld:
    """The toy world's vocabulary. `WORLD` is the one instance the project uses."""

    colors: tuple[tuple[str, RGB], ...] = (
        ("red", (220, 30, 30)),
        ("orange", (245, 140, 20)),
        ("yellow", (245, 220, 30)),
        ("green", (40, 170, 60)),
        ("blue", (30, 70, 220)),
        ("purple", (140, 50, 190)),
        ("white", (245, 245, 245)),
        ("black", (20, 20, 20)),
    )
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
    parts: tuple[str, ...] = ("outline", "centre")
    textures: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "waves")
    # Texture -> family; a scene is a background colour × a texture family.
    texture_families: tuple[tuple[str, str], ...] = (
        ("plain", "plain"),
        ("stripes", "lined"),
        ("waves", "lined"),
        ("dots", "tiled"),
        ("checker", "tiled"),
    )
    families: tuple[str, ...] = ("plain", "lined", "tiled")
    background_colors: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
    pattern_colors: tuple[str, ...] = ("white", "black")
    # Adjectives used in captions ("on a dotted green background").
    texture_adjectives: tuple[tuple[str, str], ...] = (
        ("plain", "plain"),
        ("stripes", "striped"),
        ("dots", "dotted"),
        ("checker", "checkered"),
        ("waves", "wavy"),
    )
    # Categories of the Broden index, in column order; material is always empty.
    categories: tuple[str, ...] = ("color", "object", "part", "material", "scene", "texture")

    @property
    def color_names(self) -> tuple[str, ...]:
        """Colour names in palette order."""
        return tuple(name for name, _ in self.colors)

    def rgb(self, color: str) -> RGB:
        """The RGB triple (0..255) of a named colour."""
        return dict(self.colors)[color]

    def family(self, texture: str) -> str:
        """The texture family (`plain`, `lined`, `tiled`) of a texture."""
        return dict(self.texture_families)[texture]

    def adjective(self, texture: str) -> str:
        """The caption adjective of a texture (`dots` -> `dotted`)."""
        return dict(self.texture_adjectives)[texture]

    @property
    def scenes(self) -> tuple[str, ...]:
        """Scene names, `"{background colour} {family}"`, e.g. `red lined`."""
        return tuple(f"{c} {f}" for c in self.background_colors for f in self.families)

    def scene_index(self, background: str, texture: str) -> int:
        """Index into `scenes` of a background colour and texture."""
        return self.scenes.index(f"{background} {self.family(texture)}")

    @cached_property
    def labels(self) -> tuple[Label, ...]:
        """Every label, numbered densely from 1."""
        named: list[tuple[str, tuple[str, ...]]] = [(c, ("color",)) for c in self.color_names]
        named += [(s, ("object",)) for s in self.shapes]
        named += [(p, ("part",)) for p in self.parts]
        named += [
            (t, ("object", "texture") if t == "dots" else ("texture",)) for t in self.textures
        ]
        named += [(s, ("scene",)) for s in self.scenes]
        return tuple(Label(i + 1, name, cats) for i, (name, cats) in enumerate(named))

    @cached_property
    def numbers(self) -> dict[str, int]:
        """Label name -> global label number."""
        return {label.name: label.number for label in self.labels}


WORLD = ToyWorld()
