"""A probe dataset as read from disk: rows, concepts, label planes and its content key.

The Broden and ImageFolder readers both produce a `ProbeDataset`. A row's labels load
as one (P, sh, sw) int32 array of pixel label planes (a Broden category cell with
several PNG layers fills several planes; `plane_categories[p]` names plane p's
category) and one (Q,) int32 vector of image-level labels padded with 0. Label numbers
that are not concepts of the selected categories (and the unlabeled 0) read as 0.

Confinement: every file a row names (image, label PNGs) is resolved, symlinks followed,
and opened only when it lies inside the dataset root and is a regular file; otherwise
the row is unreadable (`OutsideRoot`, counted like an undecodable image) and nothing
is read. The root itself was checked against the configured data roots when the
dataset was opened (`local_paths.local_path`), so inside the root is inside them too.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from services.common import keys
from services.common.probe_format import Concept, ConceptTable

log = logging.getLogger(__name__)

# Bumped when the stored label layout or row selection changes, so old caches are not reused.
FORMAT_VERSION = 1
# The largest image or label file read (a probe image is rarely above a few MB).
MAX_FILE_BYTES = 256 << 20


class UnreadableFile(Exception):
    """An image or label file that cannot be decoded; its row is skipped as a bad image."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


class OutsideRoot(UnreadableFile):
    """A file a dataset names that resolves outside the dataset root; it is never read."""


def confined(path: Path, root: Path) -> Path:
    """`path` resolved (symlinks followed); OutsideRoot unless it lies inside `root`.

    `root` must be resolved already.
    """
    try:
        resolved = path.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
        raise UnreadableFile(path, f"cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        error = OutsideRoot(path, f"resolves to {resolved}, outside the dataset root {root}")
        log.warning("not read: %s", error)
        raise error
    return resolved


def read_confined(path: Path, root: Path) -> bytes:
    """The bytes of the regular file `path` inside `root`; UnreadableFile otherwise.

    The resolved path is opened without following a symlink in its last component and
    checked to be a regular file of at most MAX_FILE_BYTES (a FIFO, a device or a huge
    file is refused before any read).
    """
    resolved = confined(path, root)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UnreadableFile(path, exc.strerror or type(exc).__name__) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(path, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise UnreadableFile(path, f"{info.st_size} bytes, more than {MAX_FILE_BYTES}")
        return handle.read(MAX_FILE_BYTES + 1)


@dataclass(frozen=True)
class ProbeRow:
    """One probe image: its name in the index, its file and its labels' sources."""

    name: str
    path: Path
    # (plane index, PNG file) per pixel label layer.
    label_files: tuple[tuple[int, Path], ...] = ()
    # Image-level label numbers, literal 0 already removed.
    image_labels: tuple[int, ...] = ()


@dataclass
class ProbeDataset:
    """Rows and concepts of a probe dataset after split, category and limit selection."""

    kind: str
    root: Path
    rows: list[ProbeRow]
    categories: list[str]
    concepts: list[Concept]
    plane_categories: list[str]
    image_label_slots: int
    image_size: tuple[int, int]
    mask_size: tuple[int, int]
    # Content key of everything read from the index files plus the selection.
    fingerprint: str
    # (max_label + 1,) int32: a label number if it is a concept, else 0.
    lookup: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        numbers = [c.number for c in self.concepts]
        self.lookup = np.zeros(max(numbers, default=0) + 1, dtype=np.int32)
        self.lookup[numbers] = numbers

    def key(self, chunk_size: int) -> str:
        """The dataset key: stored label chunks of `chunk_size` images depend on exactly this."""
        return keys.content_key("probe", FORMAT_VERSION, self.fingerprint, chunk_size)

    def load_image(self, row: ProbeRow) -> Image.Image:
        """The row's image as RGB; UnreadableFile when it cannot be decoded or escapes the root."""
        data = read_confined(row.path, self.root)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UnreadableFile(row.path, str(exc) or type(exc).__name__) from None

    def load_labels(self, row: ProbeRow) -> tuple[np.ndarray, np.ndarray]:
        """(P, sh, sw) int32 pixel label planes and (Q,) int32 image-level labels of a row."""
        sh, sw = self.mask_size
        planes = np.zeros((len(self.plane_categories), sh, sw), dtype=np.int32)
        lookup = self.lookup
        for plane, path in row.label_files:
            numbers = _decode_label_png(path, self.root, (sh, sw))
            inside = numbers < len(lookup)
            planes[plane] = np.where(inside, lookup[np.where(inside, numbers, 0)], 0)
        image = np.zeros(self.image_label_slots, dtype=np.int32)
        known = [n for n in row.image_labels if n < len(lookup) and lookup[n]]
        image[: len(known)] = known
        return planes, image

    def table(
        self, dataset_key: str, chunk_size: int, image_names: list[str], bad_images: list[str]
    ) -> ConceptTable:
        """The stored concept table once the readable images are known."""
        return ConceptTable(
            dataset_key=dataset_key,
            categories=list(self.categories),
            labels=list(self.concepts),
            n_images=len(image_names),
            image_size=self.image_size,
            mask_size=self.mask_size,
            chunk_size=chunk_size,
            plane_categories=list(self.plane_categories),
            image_names=image_names,
            bad_images=bad_images,
        )


def _decode_label_png(path: Path, root: Path, size: tuple[int, int]) -> np.ndarray:
    """(sh, sw) int64 label numbers R + 256·G of a label PNG inside `root`, resized to `size`."""
    data = read_confined(path, root)
    try:
        with Image.open(io.BytesIO(data)) as png:
            rgb = png.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableFile(path, str(exc) or type(exc).__name__) from None
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.NEAREST)
    pixels = np.asarray(rgb)
    return pixels[..., 0].astype(np.int64) + 256 * pixels[..., 1].astype(np.int64)
