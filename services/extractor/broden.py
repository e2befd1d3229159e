"""The Broden-format reader (specs/netdissect.md), for real Broden and the toy world alike.

Files, all read by column name:
- `index.csv`: `image,split,ih,iw,sh,sw,<category>...`. A category cell holds `;`-separated
  items: an all-digit item is an image-level label, anything else a label PNG relative to
  `images/` (pixel label = R + 256·G). Several PNGs in one cell are layers of one
  category and become separate planes. Label 0 means unlabeled and is dropped everywhere,
  a literal `0` in a scene cell included.
- `label.csv`: `number,name,category,...` with `category` like `color(289);object(3)`.
- `category.csv`: `name,...`; `c_<category>.csv`: `code,number,name,frequency,coverage`.

Selection, in this order: the split filter; the categories (default object, part, scene,
texture, color — material off, as in NetDissect-Lite); rows with no label in any selected
category dropped; the first `limit` rows kept. A label's primary category is the selected
category in which its coverage is largest (ties go to the later category, as in
NetDissect-Lite); labels in no selected category are not concepts.

Every file the directory names is confined to it: an index or category file that
resolves outside the root refuses the dataset (FAILED_PRECONDITION on `dataset.uri`);
an image or label PNG that does (a `../` row, a symlink) makes its row unreadable,
counted with the bad images and never read (probe_dataset.read_confined).
"""

from __future__ import annotations

import csv
from pathlib import Path

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import Concept
from services.extractor.probe_dataset import OutsideRoot, ProbeDataset, ProbeRow, confined

DEFAULT_CATEGORIES = ("object", "part", "scene", "texture", "color")
_REQUIRED_COLUMNS = ("image", "ih", "iw", "sh", "sw")


def _missing(root: Path, name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{root} is not a Broden-format directory: {name} is missing", field="dataset.uri"
    )


def _dataset_file(root: Path, name: str) -> Path:
    """The file `name` of the directory, resolved; FailedPrecondition if it escapes or is absent."""
    try:
        path = confined(root / name, root)
    except OutsideRoot as exc:
        raise FailedPrecondition(f"{exc}; not read", field="dataset.uri") from None
    if not path.is_file():
        raise _missing(root, name)
    return path


def _read_csv(root: Path, name: str) -> list[dict[str, str]]:
    with _dataset_file(root, name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _columns(root: Path, name: str) -> list[str]:
    with _dataset_file(root, name).open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _digest(root: Path, name: str) -> str:
    return keys.file_digest(str(_dataset_file(root, name)))


def _parse_category_cell(cell: str) -> dict[str, int]:
    """`color(289);object(3)` -> {'color': 289, 'object': 3}."""
    out: dict[str, int] = {}
    for item in cell.split(";"):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition("(")
        count = count.rstrip(")")
        out[name.strip()] = int(count) if count.isdigit() else 0
    return out


def _number(value: str, default: float = 0.0) -> float:
    try:
        return float(value)
    except ValueError:
        return default


def select_categories(requested: list[str], available: list[str]) -> list[str]:
    """The categories to use: `requested` (checked) or the defaults that the dataset has."""
    if not requested:
        return [c for c in DEFAULT_CATEGORIES if c in available]
    for category in requested:
        if category not in available:
            listed = ", ".join(repr(c) for c in available)
            raise InvalidArgument(
                f"{category!r} is not a category of this dataset; it has {listed}",
                field="dataset.categories",
            )
    return list(dict.fromkeys(requested))


def read_broden(
    root: Path, split: str = "", limit: int = 0, categories: list[str] | None = None
) -> ProbeDataset:
    """Read a Broden-format directory into a `ProbeDataset` (no image is decoded here)."""
    root = root.resolve()
    if not root.is_dir():
        raise FailedPrecondition(f"{root} is not a directory", field="dataset.uri")
    header = _columns(root, "index.csv")
    for column in _REQUIRED_COLUMNS:
        if column not in header:
            raise FailedPrecondition(
                f"{root / 'index.csv'} has no {column!r} column (header: {','.join(header)})",
                field="dataset.uri",
            )
    category_rows = _read_csv(root, "category.csv")
    label_rows = _read_csv(root, "label.csv")
    if not (root / "images").is_dir():
        raise _missing(root, "images/")
    available = [r["name"] for r in category_rows if r.get("name") in header]
    selected = select_categories(list(categories or []), available)
    coverage, category_stats, digests = _category_files(root, selected)
    concepts = _concepts(label_rows, selected, coverage, category_stats)
    index = _read_csv(root, "index.csv")
    rows, planes, slots, geometry = _rows(root, index, selected, split, limit)
    for name in ("index.csv", "label.csv", "category.csv"):
        digests[name] = _digest(root, name)
    fingerprint = keys.content_key("broden", digests, split, limit, selected)
    return ProbeDataset(
        kind="broden",
        root=root,
        rows=rows,
        categories=selected,
        concepts=concepts,
        plane_categories=planes,
        image_label_slots=slots,
        image_size=(geometry[0], geometry[1]),
        mask_size=(geometry[2], geometry[3]),
        fingerprint=fingerprint,
    )


def _category_files(
    root: Path, selected: list[str]
) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], int], dict[str, str]]:
    """Per (category, label number): coverage and frequency from `c_<category>.csv`."""
    coverage: dict[tuple[str, int], float] = {}
    frequency: dict[tuple[str, int], int] = {}
    digests: dict[str, str] = {}
    for category in selected:
        name = f"c_{category}.csv"
        for row in _read_csv(root, name):
            number = int(_number(row.get("number", ""), -1))
            if number > 0:
                coverage[category, number] = _number(row.get("coverage", ""))
                frequency[category, number] = int(_number(row.get("frequency", "")))
        digests[name] = _digest(root, name)
    return coverage, frequency, digests


def _concepts(
    label_rows: list[dict[str, str]],
    selected: list[str],
    coverage: dict[tuple[str, int], float],
    frequency: dict[tuple[str, int], int],
) -> list[Concept]:
    """Labels that belong to a selected category, each with its primary category."""
    concepts = []
    for row in label_rows:
        number = int(_number(row.get("number", ""), -1))
        if number <= 0:
            continue
        listed = _parse_category_cell(row.get("category", ""))
        candidates = [(i, c) for i, c in enumerate(selected) if c in listed]
        if not candidates:
            continue
        _, primary = max(candidates, key=lambda ic: (coverage.get((ic[1], number), 0.0), ic[0]))
        concepts.append(
            Concept(
                number=number,
                name=row.get("name", str(number)),
                category=primary,
                frequency=frequency.get((primary, number), listed[primary]),
                coverage=coverage.get((primary, number), 0.0),
            )
        )
    return sorted(concepts, key=lambda c: c.number)


def _rows(
    root: Path, index: list[dict[str, str]], selected: list[str], split: str, limit: int
) -> tuple[list[ProbeRow], list[str], int, tuple[int, int, int, int]]:
    """Selected rows, the plane categories, image-level slots and (ih, iw, sh, sw)."""
    if split:
        splits = sorted({r.get("split", "") for r in index})
        index = [r for r in index if r.get("split", "") == split]
        if not index:
            listed = ", ".join(repr(s) for s in splits)
            raise InvalidArgument(
                f"no rows with split {split!r}; splits: {listed}", field="dataset.split"
            )
    parsed: list[tuple[dict[str, str], dict[str, list[str]], list[int]]] = []
    layers = dict.fromkeys(selected, 0)
    for row in index:
        pngs: dict[str, list[str]] = {}
        numbers: list[int] = []
        for category in selected:
            items = [s.strip() for s in (row.get(category) or "").split(";") if s.strip()]
            numbers += [int(s) for s in items if s.isdigit() and int(s) != 0]
            pngs[category] = [s for s in items if not s.isdigit()]
        if not numbers and not any(pngs.values()):
            continue
        parsed.append((row, pngs, numbers))
        if limit and len(parsed) >= limit:
            break
    if not parsed:
        raise FailedPrecondition(
            f"{root / 'index.csv'} has no row with labels in {', '.join(selected)}"
            + (f" for split {split!r}" if split else ""),
            field="dataset.uri",
        )
    for _, pngs, _ in parsed:
        for category, files in pngs.items():
            layers[category] = max(layers[category], len(files))
    plane_categories = [c for c in selected for _ in range(layers[c])]
    first_plane = {c: plane_categories.index(c) for c in selected if layers[c]}
    images = root / "images"
    rows = [
        ProbeRow(
            name=row["image"],
            path=images / row["image"],
            label_files=tuple(
                (first_plane[category] + k, images / file)
                for category, files in pngs.items()
                for k, file in enumerate(files)
            ),
            image_labels=tuple(numbers),
        )
        for row, pngs, numbers in parsed
    ]
    slots = max(len(numbers) for _, _, numbers in parsed)
    first = parsed[0][0]
    try:
        geometry = (int(first["ih"]), int(first["iw"]), int(first["sh"]), int(first["sw"]))
    except ValueError:
        raise FailedPrecondition(
            f"{root / 'index.csv'}: row {first['image']!r} has non-numeric ih/iw/sh/sw",
            field="dataset.uri",
        ) from None
    return rows, plane_categories, slots, geometry
