from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.toyworld.generator import decode_labels, encode_labels, generate
from services.toyworld.raster import PALETTE
from services.toyworld.world import WORLD

N_IMAGES = 60
SIZE = 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("toy"), N_IMAGES, SIZE, seed=3)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(toy: Path, tmp_path: Path) -> None:
    again = all_files(generate(tmp_path / "again", N_IMAGES, SIZE, seed=3))
    assert again == all_files(toy)
    other = all_files(generate(tmp_path / "other", N_IMAGES, SIZE, seed=4))
    assert other.keys() == again.keys()
    assert other["index.csv"] != again["index.csv"]


def test_first_images_do_not_depend_on_how_many_are_generated(toy: Path, tmp_path: Path) -> None:
    fewer = generate(tmp_path / "fewer", 5, SIZE, seed=3)
    for name in ("toy_000004.png", "toy_000004_part_2.png"):
        assert (fewer / "images" / name).read_bytes() == (toy / "images" / name).read_bytes()


def test_index_has_broden_columns_and_files(toy: Path) -> None:
    with (toy / "index.csv").open(newline="") as handle:
        header = next(csv.reader(handle))
    expected = "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture"
    assert header == expected.split(",")
    rows = read_csv(toy / "index.csv")
    assert len(rows) == N_IMAGES
    assert {r["split"] for r in rows} == {"train", "val"}
    for row in rows:
        assert (int(row["ih"]), int(row["iw"]), int(row["sh"]), int(row["sw"])) == (
            SIZE, SIZE, SIZE // 2, SIZE // 2,
        )  # fmt: skip
        assert row["material"] == ""
        assert row["scene"].isdigit() and row["texture"].isdigit()
        image = Image.open(toy / "images" / row["image"])
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        for category in ("color", "object", "part"):
            for layer in row[category].split(";"):
                assert not layer.isdigit()
                assert Image.open(toy / "images" / layer).size == (SIZE // 2, SIZE // 2)


def test_part_cell_holds_two_overlapping_layers(toy: Path) -> None:
    rows = read_csv(toy / "index.csv")
    assert all(len(r["part"].split(";")) == 2 for r in rows)
    overlap = 0
    for row in rows:
        outline, centre = (
            decode_labels(np.asarray(Image.open(toy / "images" / p)))
            for p in row["part"].split(";")
        )
        assert set(np.unique(outline)) <= {0, WORLD.numbers["outline"]}
        assert set(np.unique(centre)) <= {0, WORLD.numbers["centre"]}
        overlap += int(((outline > 0) & (centre > 0)).sum())
    assert overlap > 0


def test_scene_withheld_as_literal_zero(toy: Path) -> None:
    scenes = [r["scene"] for r in read_csv(toy / "index.csv")]
    assert scenes[0] == "0" and scenes[50] == "0"
    scene_numbers = {WORLD.numbers[s] for s in WORLD.scenes}
    assert all(int(s) in scene_numbers for i, s in enumerate(scenes) if i % 50)


def test_label_pngs_decode_to_labels_of_their_category(toy: Path) -> None:
    allowed = {
        category: {x.number for x in WORLD.labels if category in x.categories} | {0}
        for category in ("color", "object")
    }
    for row in read_csv(toy / "index.csv"):
        for category, numbers in allowed.items():
            rgb = np.asarray(Image.open(toy / "images" / row[category]))
            assert rgb[..., 2].max() == 0
            assert set(np.unique(decode_labels(rgb))) <= numbers
        colors = decode_labels(np.asarray(Image.open(toy / "images" / row["color"])))
        assert colors.min() > 0  # every pixel has a colour


def test_color_labels_match_image_pixels(toy: Path) -> None:
    agree = []
    for row in read_csv(toy / "index.csv"):
        image = np.asarray(Image.open(toy / "images" / row["image"]))
        labels = decode_labels(np.asarray(Image.open(toy / "images" / row["color"])))
        # A label pixel covers a 2×2 block of image pixels and samples the geometry at the
        # block's centre: its colour is one of theirs, except on features under a pixel wide.
        block = image.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).transpose(0, 2, 1, 3, 4)
        expected = PALETTE[labels - 1][:, :, None, None, :]
        agree.append((block == expected).all(axis=-1).any(axis=(2, 3)).mean())
    assert min(agree) > 0.95 and np.mean(agree) > 0.995


def test_label_codes_round_trip_above_255() -> None:
    plane = np.array([[0, 7], [300, 65535]])
    assert (decode_labels(encode_labels(plane)) == plane).all()


def test_label_and_category_tables(toy: Path) -> None:
    labels = read_csv(toy / "label.csv")
    assert list(labels[0]) == ["number", "name", "category", "frequency", "coverage", "syns"]
    assert [int(r["number"]) for r in labels] == [x.number for x in WORLD.labels]
    for row in labels:
        assert re.fullmatch(r"[a-z]+\(\d+\)(;[a-z]+\(\d+\))*", row["category"])
    categories = read_csv(toy / "category.csv")
    assert list(categories[0]) == ["name", "first", "last", "count", "frequency"]
    assert [r["name"] for r in categories] == ["color", "object", "part", "scene", "texture"]
    for cat in categories:
        codes = read_csv(toy / f"c_{cat['name']}.csv")
        assert list(codes[0]) == ["code", "number", "name", "frequency", "coverage"]
        assert [int(c["code"]) for c in codes] == list(range(1, int(cat["count"]) + 1))


def test_frequencies_match_the_index(toy: Path) -> None:
    rows = read_csv(toy / "index.csv")
    textures = read_csv(toy / "c_texture.csv")
    for code in textures:
        assert int(code["frequency"]) == sum(r["texture"] == code["number"] for r in rows)
        assert float(code["coverage"]) == 1.0


def test_a_label_whose_primary_category_is_not_listed_first(toy: Path) -> None:
    coverage = {
        (cat["name"], code["name"]): float(code["coverage"])
        for cat in read_csv(toy / "category.csv")
        for code in read_csv(toy / f"c_{cat['name']}.csv")
    }
    found = []
    for row in read_csv(toy / "label.csv"):
        listed = [item.split("(")[0] for item in row["category"].split(";")]
        primary = max(listed, key=lambda c: coverage[c, row["name"]])
        if primary != listed[0]:
            found.append((row["name"], listed[0], primary))
    assert found == [("dots", "object", "texture")]


def test_captions_and_objects(toy: Path) -> None:
    captions = read_csv(toy / "captions.csv")
    assert len(captions) == N_IMAGES
    assert all(re.search(r" on an? \w+ \w+ background$", c["caption"]) for c in captions)
    objects = read_csv(toy / "objects.csv")
    assert {o["label"] for o in objects} <= set(WORLD.shapes)
    for o in objects:
        assert o["description"].endswith(f"{o['color']} {o['label']}")


@pytest.mark.parametrize(
    ("n_images", "image_size", "seed", "field"),
    [
        (0, 32, 0, "n_images"),
        (4, 33, 0, "image_size"),
        (4, 8, 0, "image_size"),
        (4, 32, -1, "seed"),
    ],
)
def test_rejects_bad_parameters(
    tmp_path: Path, n_images: int, image_size: int, seed: int, field: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        generate(tmp_path, n_images, image_size, seed)
    assert error.value.field == field
