"""Thumbnails of chosen probe images (`Materialize`), for exemplars and reports.

Image ids are probe indices of a stored dataset: positions among its readable images
(`ConceptTable.image_names`). A thumbnail is the image as stored, or resized so its
longer side is `size` pixels, encoded as PNG under `keys.thumbnail`.
"""

from __future__ import annotations

import io

from PIL import Image

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.probe_format import ConceptTable
from services.common.store import ObjectStore
from services.extractor.probe_dataset import ProbeDataset, UnreadableFile

MAX_IDS = 10_000
MAX_SIZE = 4096


def thumbnail_png(image: Image.Image, size: int) -> bytes:
    """PNG bytes of `image`, scaled so its longer side is `size` px (0: unchanged)."""
    if size:
        scale = size / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(target, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def materialize(
    store: ObjectStore,
    dataset: ProbeDataset,
    table: ConceptTable,
    image_ids: list[int],
    size: int = 0,
) -> list[str]:
    """Store thumbnails of `image_ids` and return their keys, in the order asked."""
    if len(image_ids) > MAX_IDS:
        raise InvalidArgument(f"{len(image_ids)} ids; at most {MAX_IDS} per call", "image_ids")
    if not 0 <= size <= MAX_SIZE:
        raise InvalidArgument(f"{size} is outside [0, {MAX_SIZE}] (0 = as stored)", "size")
    for position, image_id in enumerate(image_ids):
        if not 0 <= image_id < table.n_images:
            raise InvalidArgument(
                f"{image_id} is not a probe image id; the dataset has ids 0..{table.n_images - 1}",
                field=f"image_ids[{position}]",
            )
    rows = {row.name: row for row in dataset.rows}
    out = []
    for image_id in image_ids:
        name = table.image_names[image_id]
        if name not in rows:
            raise FailedPrecondition(
                f"image {name!r} of dataset {table.dataset_key} is not in the dataset given",
                field="dataset",
            )
        try:
            image = dataset.load_image(rows[name])
        except UnreadableFile as exc:
            raise FailedPrecondition(f"cannot read probe image {image_id}: {exc}",
                                     field="dataset") from None
        key = keys.thumbnail(table.dataset_key, image_id, size)
        store.put(key, thumbnail_png(image, size))
        out.append(key)
    return out
