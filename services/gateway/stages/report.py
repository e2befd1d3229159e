"""REPORTING, last step: layer summaries, exemplar thumbnails and the static pages.

Per-layer summaries are computed from the stored method summaries, the units'
exemplar thumbnails are materialized by the extractor, and the web UI's pages are
written as a static copy under `reports/{job}/` (`index.html` first).
"""

from __future__ import annotations

import functools
import logging

from neurodissect.v1 import common_pb2, extractor_pb2

from services.common import keys
from services.common.errors import NeurodissectError
from services.common.result_store import layer_summary
from services.gateway import results
from services.gateway.stage_context import StageClock, StageContext
from services.gateway.webui import export, figures
from services.gateway.webui.data import JobReader
from services.gateway.webui.pages import PageBuilder
from services.gateway.webui.render import Renders

log = logging.getLogger(__name__)

NAME = "report"
# Thumbnails asked of the extractor in one Materialize call.
MATERIALIZE_BATCH = 512


def materialize_thumbnails(
    ctx: StageContext, layers: dict[str, list[common_pb2.UnitResult]]
) -> None:
    """Have the extractor store the thumbnails of every unit's exemplars shown in the pages.

    The pages are still written without the images it cannot provide; that is
    logged, not a job failure.
    """
    job = ctx.job
    wanted = list(dict.fromkeys(
        image_id
        for units in layers.values()
        for unit in units
        for image_id in unit.netdissect.exemplars[:figures.UNIT_EXEMPLARS]
    ))
    try:
        for start in range(0, len(wanted), MATERIALIZE_BATCH):
            request = extractor_pb2.MaterializeRequest(
                dataset=job.spec.dataset,
                dataset_key=job.dataset_key,
                image_ids=wanted[start : start + MATERIALIZE_BATCH],
                size=figures.IMAGE_PX,
            )
            ctx.retrying("extractor", functools.partial(ctx.peers.materialize, request))
    except NeurodissectError as exc:
        log.warning("job %s: pages without some exemplar images: %s", job.id, exc)


def run(ctx: StageContext) -> None:
    """Store the layer summaries in the job, the thumbnails and the pages."""
    ctx.enter(common_pb2.REPORTING)
    job = ctx.job
    clock = StageClock(NAME, "units")
    layers = {
        layer: results.unit_results(ctx.store, job.id, layer) for layer in job.spec.layers
    }
    del job.summary[:]
    job.summary.extend(
        layer_summary(ctx.store, job.id, layer, ctx.n_units(layer)) for layer in layers
    )
    materialize_thumbnails(ctx, layers)
    ctx.run.check()
    # The copy describes the job as it ends: this stage is its last step.
    finished = common_pb2.Job()
    finished.CopyFrom(job)
    finished.state = common_pb2.SUCCEEDED
    builder = PageBuilder(JobReader(ctx.store, jobs=ctx.jobs), Renders(ctx.store), live=False)
    export.write_copy(builder, finished, export.store_put(ctx.store, job.id))
    job.report_key = keys.report(job.id, "index.html")
    total = sum(s.units for s in job.summary)
    ctx.save(clock.progress(total, total, "report written"))
