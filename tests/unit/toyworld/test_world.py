from __future__ import annotations

from services.toyworld.world import WORLD


def test_labels_are_numbered_densely_with_unique_names() -> None:
    numbers = [label.number for label in WORLD.labels]
    assert numbers == list(range(1, len(WORLD.labels) + 1))
    names = [label.name for label in WORLD.labels]
    assert len(set(names)) == len(names)
    assert WORLD.numbers["red"] == 1


def test_vocabulary() -> None:
    assert len(WORLD.colors) == 8
    assert set(WORLD.background_colors) | set(WORLD.pattern_colors) <= set(WORLD.color_names)
    assert {WORLD.family(t) for t in WORLD.textures} == set(WORLD.families)
    assert len(WORLD.scenes) == len(WORLD.background_colors) * len(WORLD.families)
    assert WORLD.scenes[WORLD.scene_index("blue", "waves")] == "blue lined"


def test_only_dots_has_two_categories() -> None:
    multi = {label.name: label.categories for label in WORLD.labels if len(label.categories) > 1}
    assert multi == {"dots": ("object", "texture")}
