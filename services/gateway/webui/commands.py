"""What `neurodissect report` and `neurodissect show` do, from a store (and the extractor).

- `copy_report`: a job's static copy into a local folder: the stored one (written
  by the job's REPORTING stage) when the job has finished, else built now from
  what the store holds.
- `unit_overlay`: one unit's mask on any probe image of the job's dataset, at any
  size, as PNG (the thumbnail is materialized by the extractor when not stored).
"""

from __future__ import annotations

from pathlib import Path

from services.common import keys
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.store import ObjectStore
from services.gateway.jobs import TERMINAL
from services.gateway.webui import export, figures
from services.gateway.webui.data import JobReader, Materialize
from services.gateway.webui.pages import PageBuilder
from services.gateway.webui.render import Renders

MAX_SHOW_PX = 2048


def copy_report(store: ObjectStore, job_id: str, out: Path) -> tuple[int, bool]:
    """Write the job's static copy into `out`: (files written, whether it was the stored one)."""
    reader = JobReader(store)
    job = reader.job(job_id)
    put = export.directory_put(out)
    if job.state in TERMINAL and store.exists(keys.report(job_id, "index.html")):
        return export.download_copy(store, job_id, put), True
    builder = PageBuilder(reader, Renders(store), live=False)
    return export.write_copy(builder, job, put), False


def unit_overlay(
    store: ObjectStore, materialize: Materialize | None, job_id: str, layer: str, unit: int,
    image: int | None = None, size: int = 224,
) -> tuple[bytes, int]:
    """(PNG of the unit's thresholded mask on a probe image, that image's id).

    `image` None: the unit's top exemplar. The mask is the raw map resized to the
    image (`size` px on its longer side) and thresholded at the unit's NetDissect threshold.
    """
    if not 16 <= size <= MAX_SHOW_PX:
        raise InvalidArgument(f"{size} is outside [16, {MAX_SHOW_PX}]", "size")
    reader = JobReader(store, materialize)
    job = reader.job(job_id)
    if layer not in job.spec.layers:
        listed = ", ".join(job.spec.layers)
        raise NotFound(f"job {job_id} has no layer {layer!r} (it has {listed})", "layer")
    result = reader.unit(job, layer, unit)
    if not result.HasField("netdissect"):
        raise FailedPrecondition(
            "the unit has no NetDissect answer, whose threshold draws the mask", "layer"
        )
    if image is None:
        if not result.netdissect.exemplars:
            raise InvalidArgument("the unit has no stored exemplars; name one", "image")
        image = int(result.netdissect.exemplars[0])
    png, _ = figures.overlay_png(reader, job, result, image, size)
    return png, image
