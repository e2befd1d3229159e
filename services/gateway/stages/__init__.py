"""A job's stages in running order, each a function of the job's `StageContext`.

1. `extract` (EXTRACTING): one Extract call for all layers.
2. `explain` (EXPLAINING): per layer, Explain with the requested explainer methods.
   `occlusion` (EXPLAINING): when the spec sets `occlusion`, the extractor's Occlude
   step, then Explain `occlusion` per layer (after NetDissect's labels).
3. `caption` (CAPTIONING): per layer, Caption when the spec sets `milan`.
4. `scoring` (REPORTING): simulation scores every method's stored answers.
   `ablation` (REPORTING): when the spec sets `ablation`, the extractor's classifier
   heads and classes, then Explain `ablation` per layer (after simulation).
5. `report` (REPORTING): layer summaries, exemplar thumbnails, the static pages.

A stage skips what is already stored, so a job resumed after a gateway crash redoes
nothing that completed. Adding a stage adds its module here.
"""

from __future__ import annotations

from collections.abc import Callable

from services.gateway.stage_context import StageContext
from services.gateway.stages import (
    ablation,
    caption,
    explain,
    extract,
    occlusion,
    report,
    scoring,
)

# (name used in a failed job's error, stage function), in running order.
PIPELINE: tuple[tuple[str, Callable[[StageContext], None]], ...] = (
    (extract.NAME, extract.run),
    (explain.NAME, explain.run),
    (occlusion.NAME, occlusion.run),
    (caption.NAME, caption.run),
    (scoring.NAME, scoring.run),
    (ablation.NAME, ablation.run),
    (report.NAME, report.run),
)
