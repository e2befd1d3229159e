"""ImageFolder probe datasets: `root/<class>/**/<image>`, class names as image-level concepts.

Classes are the subdirectories of `root` (of `root/<split>` when a split is given),
sorted by name and numbered from 1; each becomes a concept of category `class` that
covers its images entirely. Files are taken in sorted order with torchvision's image
extensions; the first `limit` are kept. There are no pixel labels; the nominal image
size is 224 and the mask size 112 (Broden's geometry), which is what the explainer uses
to count image-level label pixels.

An entry that resolves outside the root (a symlinked file or class directory pointing
elsewhere) stays a row so that it is counted with the bad images, but nothing of its
target is read or stat'ed: loading it fails with `OutsideRoot`.
"""

from __future__ import annotations

from pathlib import Path

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import Concept
from services.extractor.probe_dataset import OutsideRoot, ProbeDataset, ProbeRow, confined

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CATEGORY = "class"
IMAGE_SIZE = 224
MASK_SIZE = 112


def read_imagefolder(
    root: Path, split: str = "", limit: int = 0, categories: list[str] | None = None
) -> ProbeDataset:
    """Index an ImageFolder directory into a `ProbeDataset` (no image is decoded here)."""
    root = root.resolve()
    if categories and list(categories) != [CATEGORY]:
        raise InvalidArgument(
            f"an imagefolder dataset has one category, {CATEGORY!r}", field="dataset.categories"
        )
    base = root / split if split else root
    if not base.resolve().is_relative_to(root):
        raise InvalidArgument(f"{split!r} leads outside {root}", field="dataset.split")
    if not base.is_dir():
        if split:
            raise InvalidArgument(f"{root} has no split directory {split!r}", "dataset.split")
        raise FailedPrecondition(f"{root} is not a directory", field="dataset.uri")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FailedPrecondition(
            f"{base} is not an ImageFolder directory: it has no class subdirectories",
            field="dataset.uri",
        )
    rows: list[ProbeRow] = []
    counts = dict.fromkeys(classes, 0)
    listing: list[tuple[str, int]] = []
    for number, name in enumerate(classes, start=1):
        files = sorted(
            p for p in (base / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        for path in files:
            if limit and len(rows) >= limit:
                break
            relative = path.relative_to(base).as_posix()
            rows.append(ProbeRow(name=relative, path=path, image_labels=(number,)))
            listing.append((relative, _size(path, root)))
            counts[name] += 1
    if not rows:
        raise FailedPrecondition(f"{base} holds no images ({', '.join(IMAGE_EXTENSIONS)})",
                                 field="dataset.uri")
    concepts = [
        Concept(number=i, name=name, category=CATEGORY, frequency=counts[name], coverage=1.0)
        for i, name in enumerate(classes, start=1)
    ]
    return ProbeDataset(
        kind="imagefolder",
        root=root,
        rows=rows,
        categories=[CATEGORY],
        concepts=concepts,
        plane_categories=[],
        image_label_slots=1,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        mask_size=(MASK_SIZE, MASK_SIZE),
        fingerprint=keys.content_key("imagefolder", classes, listing, split, limit),
    )


def _size(path: Path, root: Path) -> int:
    """The byte size of an image inside `root`, -1 for one outside (its target is not touched)."""
    try:
        return confined(path, root).stat().st_size
    except OutsideRoot:
        return -1
