"""The Broden-format reader on a hand-written fixture with every tricky case of the format."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import FailedPrecondition, InvalidArgument
from services.extractor import probe_dataset
from services.extractor.broden import read_broden
from services.extractor.probe_dataset import OutsideRoot, UnreadableFile

MASK = 4

# Label numbers: 300 needs the G channel (R=44, G=1).
RED, BLUE, CAR, WHEEL, STREET, STRIPED, WOOD, SKY = 1, 2, 3, 4, 5, 6, 7, 300


def _mask(value: int, where: tuple[slice, slice]) -> np.ndarray:
    plane = np.zeros((MASK, MASK), dtype=np.int64)
    plane[where] = value
    return plane


def _write_png(path: Path, plane: np.ndarray) -> None:
    rgb = np.zeros((*plane.shape, 3), dtype=np.uint8)
    rgb[..., 0] = plane % 256
    rgb[..., 1] = plane // 256
    Image.fromarray(rgb).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_broden(root: Path) -> Path:
    """Four rows: a (layered part, literal 0 scene), b (material only), c, d (wood + sky)."""
    images = root / "images"
    images.mkdir(parents=True)
    for name in "abcd":
        pixels = np.full((8, 8, 3), ord(name), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{name}.jpg")
    top, left = (slice(0, 2), slice(None)), (slice(None), slice(0, 2))
    _write_png(images / "a_color.png", _mask(RED, top) + _mask(BLUE, (slice(2, 4), slice(None))))
    _write_png(images / "a_object.png", _mask(CAR, top))
    _write_png(images / "a_part1.png", _mask(WHEEL, top))
    _write_png(images / "a_part2.png", _mask(WHEEL, left))
    _write_png(images / "b_material.png", _mask(WOOD, top))
    _write_png(images / "c_color.png", _mask(BLUE, left))
    _write_png(images / "d_object.png", _mask(WOOD, top) + _mask(SKY, (slice(3, 4), slice(None))))
    # Columns in an unusual order: the reader must go by name.
    header = ["image", "iw", "ih", "split", "sw", "sh", "scene", "texture", "color", "object",
              "part", "material"]
    _write_csv(root / "index.csv", header, [
        ["a.jpg", 8, 8, "train", MASK, MASK, "0", str(STRIPED), "a_color.png", "a_object.png",
         "a_part1.png;a_part2.png", ""],
        ["b.jpg", 8, 8, "val", MASK, MASK, "", "", "", "", "", "b_material.png"],
        ["c.jpg", 8, 8, "train", MASK, MASK, str(STREET), "", "c_color.png", "", "", ""],
        ["d.jpg", 8, 8, "train", MASK, MASK, "", "", "", "d_object.png", "", ""],
    ])
    label_header = ["number", "name", "category", "frequency", "coverage", "syns"]
    _write_csv(root / "label.csv", label_header, [
        [RED, "red", "color(1)", 1, 0.5, ""],
        [BLUE, "blue", "color(2)", 2, 0.4, ""],
        [CAR, "car", "object(1)", 1, 0.5, ""],
        # Listed first under object, but its part coverage is larger: primary is part.
        [WHEEL, "wheel", "object(1);part(1)", 1, 0.4, ""],
        [STREET, "street", "scene(1)", 1, 1.0, ""],
        [STRIPED, "striped", "texture(1)", 1, 1.0, ""],
        [WOOD, "wood", "material(2)", 2, 0.5, ""],
        [SKY, "sky", "object(1)", 1, 0.25, ""],
    ])
    categories = ["color", "object", "part", "material", "scene", "texture"]
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[c, 1, 1, 1, 1] for c in categories])
    c_header = ["code", "number", "name", "frequency", "coverage"]
    _write_csv(root / "c_color.csv", c_header, [[1, RED, "red", 1, 0.5], [2, BLUE, "blue", 2, 0.4]])
    _write_csv(root / "c_object.csv", c_header,
               [[1, CAR, "car", 1, 0.5], [2, WHEEL, "wheel", 1, 0.05], [3, SKY, "sky", 1, 0.25]])
    _write_csv(root / "c_part.csv", c_header, [[1, WHEEL, "wheel", 1, 0.4]])
    _write_csv(root / "c_material.csv", c_header, [[1, WOOD, "wood", 2, 0.5]])
    _write_csv(root / "c_scene.csv", c_header, [[1, STREET, "street", 1, 1.0]])
    _write_csv(root / "c_texture.csv", c_header, [[1, STRIPED, "striped", 1, 1.0]])
    return root


@pytest.fixture()
def broden(tmp_path: Path) -> Path:
    return write_broden(tmp_path / "broden")


def test_default_selection_drops_rows_without_selected_data(broden: Path) -> None:
    dataset = read_broden(broden)
    assert dataset.categories == ["object", "part", "scene", "texture", "color"]
    assert [row.name for row in dataset.rows] == ["a.jpg", "c.jpg", "d.jpg"]  # b: material only
    assert dataset.image_size == (8, 8) and dataset.mask_size == (MASK, MASK)
    assert dataset.rows[0].path == broden / "images" / "a.jpg"


def test_layered_part_cell_fills_two_planes(broden: Path) -> None:
    dataset = read_broden(broden)
    assert dataset.plane_categories == ["object", "part", "part", "color"]
    pixel, _ = dataset.load_labels(dataset.rows[0])
    assert pixel.shape == (4, MASK, MASK) and pixel.dtype == np.int32
    np.testing.assert_array_equal(pixel[1], _mask(WHEEL, (slice(0, 2), slice(None))))
    np.testing.assert_array_equal(pixel[2], _mask(WHEEL, (slice(None), slice(0, 2))))
    # The layers overlap: the label's mask is their union, 12 of 16 pixels.
    assert int(((pixel[1] == WHEEL) | (pixel[2] == WHEEL)).sum()) == 12
    np.testing.assert_array_equal(pixel[0], _mask(CAR, (slice(0, 2), slice(None))))
    assert set(np.unique(pixel[3])) == {RED, BLUE}


def test_literal_zero_in_scene_cell_is_ignored(broden: Path) -> None:
    dataset = read_broden(broden)
    assert dataset.rows[0].image_labels == (STRIPED,)
    assert dataset.image_label_slots == 1
    _, image = dataset.load_labels(dataset.rows[0])
    np.testing.assert_array_equal(image, [STRIPED])
    _, image = dataset.load_labels(dataset.rows[1])
    np.testing.assert_array_equal(image, [STREET])


def test_primary_category_is_largest_coverage_not_first(broden: Path) -> None:
    concepts = {c.name: c for c in read_broden(broden).concepts}
    assert concepts["wheel"].category == "part"
    assert concepts["wheel"].coverage == pytest.approx(0.4)
    assert concepts["car"].category == "object"
    assert "wood" not in concepts  # material is not selected by default
    numbers = [c.number for c in read_broden(broden).concepts]
    assert numbers == sorted(numbers)


def test_label_numbers_use_green_channel_and_unselected_labels_read_as_zero(broden: Path) -> None:
    dataset = read_broden(broden)
    pixel, _ = dataset.load_labels(dataset.rows[2])
    assert int((pixel[0] == SKY).sum()) == MASK
    assert not (pixel == WOOD).any()  # wood is a material label: not a concept here
    assert int((pixel[0] == 0).sum()) == MASK * MASK - MASK


def test_category_selection_split_and_limit(broden: Path) -> None:
    material = read_broden(broden, categories=["material"])
    assert [row.name for row in material.rows] == ["b.jpg"]
    assert [c.name for c in material.concepts] == ["wood"]
    assert material.plane_categories == ["material"]
    colour = read_broden(broden, categories=["color"])
    assert [row.name for row in colour.rows] == ["a.jpg", "c.jpg"]
    assert [row.name for row in read_broden(broden, limit=2).rows] == ["a.jpg", "c.jpg"]
    assert [row.name for row in read_broden(broden, split="val", categories=["material"]).rows] \
        == ["b.jpg"]
    with pytest.raises(InvalidArgument, match=r"splits: 'train', 'val'"):
        read_broden(broden, split="test")
    with pytest.raises(InvalidArgument, match=r"dataset.categories.*'clouds'"):
        read_broden(broden, categories=["clouds"])
    with pytest.raises(FailedPrecondition, match=r"no row with labels"):
        read_broden(broden, split="val")


def test_fingerprint_follows_content_and_selection(broden: Path) -> None:
    first = read_broden(broden)
    assert read_broden(broden).fingerprint == first.fingerprint
    assert first.key(256) != first.key(128)
    assert read_broden(broden, limit=2).fingerprint != first.fingerprint
    with (broden / "index.csv").open("a") as handle:
        handle.write(f"a.jpg,8,8,train,{MASK},{MASK},{STREET},,,,,\n")
    assert read_broden(broden).fingerprint != first.fingerprint


@pytest.mark.parametrize("missing", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_file_is_named(broden: Path, missing: str) -> None:
    (broden / missing).unlink()
    with pytest.raises(FailedPrecondition, match=rf"not a Broden-format directory: {missing}"):
        read_broden(broden)


def test_missing_index_column_is_named(broden: Path) -> None:
    text = (broden / "index.csv").read_text().replace("sh,", "shh,", 1)
    (broden / "index.csv").write_text(text)
    with pytest.raises(FailedPrecondition, match=r"no 'sh' column"):
        read_broden(broden)


def test_index_rows_that_escape_are_unreadable_and_never_opened(
    broden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(outside / "secret.png")
    with (broden / "index.csv").open("a", newline="") as handle:
        csv.writer(handle).writerows([
            ["../../outside/secret.png", 8, 8, "train", MASK, MASK, str(STREET), "", "", "", "",
             ""],
            ["a.jpg", 8, 8, "train", MASK, MASK, "", "", "../../outside/secret.png", "", "", ""],
            [str(outside / "secret.png"), 8, 8, "train", MASK, MASK, str(STREET), "", "", "", "",
             ""],
        ])
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], *args: int) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", recording_open)
    dataset = read_broden(broden)
    climbing, bad_label, absolute = dataset.rows[-3:]
    with pytest.raises(OutsideRoot, match=r"outside the dataset root"):
        dataset.load_image(climbing)
    dataset.load_image(bad_label)  # the image itself is inside
    with pytest.raises(OutsideRoot, match=r"outside/secret.png"):
        dataset.load_labels(bad_label)
    with pytest.raises(OutsideRoot):
        dataset.load_image(absolute)
    assert opened and not [p for p in opened if "outside" in p]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3 and all("outside the dataset root" in w for w in warnings)


def test_dataset_files_that_escape_refuse_the_dataset(broden: Path, tmp_path: Path) -> None:
    outside = tmp_path / "label.csv"
    (broden / "label.csv").rename(outside)
    (broden / "label.csv").symlink_to(outside)
    with pytest.raises(FailedPrecondition, match=r"^dataset.uri: .*outside the dataset root"):
        read_broden(broden)
    (broden / "label.csv").unlink()
    outside.rename(broden / "label.csv")
    # A category whose c_<category>.csv name climbs out of the root to a file there.
    (tmp_path / "secret.csv").write_text("code,number,name,frequency,coverage\n")
    with (broden / "category.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(["/../../secret", 1, 1, 1, 1])
    with (broden / "index.csv").open() as handle:
        text = handle.read()
    header, rest = text.split("\n", 1)
    (broden / "index.csv").write_text(header.rstrip("\r") + ",/../../secret\n" + rest)
    with pytest.raises(FailedPrecondition, match=r"secret.csv.*outside the dataset root"):
        read_broden(broden, categories=["/../../secret"])


def test_a_label_file_that_is_no_regular_file_is_not_read(broden: Path) -> None:
    (broden / "images" / "a_object.png").unlink()
    os.mkfifo(broden / "images" / "a_object.png")  # opening it for reading would block
    dataset = read_broden(broden)
    with pytest.raises(UnreadableFile, match=r"not a regular file"):
        dataset.load_labels(dataset.rows[0])


def test_rows_whose_paths_cannot_be_resolved_are_unreadable(
    broden: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = broden / "images"
    (images / "loop_a.png").symlink_to(images / "loop_b.png")
    (images / "loop_b.png").symlink_to(images / "loop_a.png")
    with (broden / "index.csv").open("a", newline="") as handle:
        csv.writer(handle).writerows([
            ["nul\x00.png", 8, 8, "train", MASK, MASK, str(STREET), "", "", "", "", ""],
            ["loop_a.png", 8, 8, "train", MASK, MASK, str(STREET), "", "", "", "", ""],
        ])
    dataset = read_broden(broden)
    for row in dataset.rows[-2:]:
        with pytest.raises(UnreadableFile):
            dataset.load_image(row)
    monkeypatch.setattr(probe_dataset, "MAX_FILE_BYTES", 16)
    with pytest.raises(UnreadableFile, match=r"more than 16"):
        dataset.load_image(dataset.rows[0])
