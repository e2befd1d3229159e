"""Train a MILAN captioner from a MILANNOTATIONS directory into a checkpoint file.

`train_from_annotations` encodes the exemplars with the frozen backbone, fits decoder
and language model (`training`) and writes a self-describing checkpoint atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from services.common.atomic_file import atomic_write

if TYPE_CHECKING:
    from services.captioner.captioner import Captioner
    from services.captioner.training import ModelDimensions, TrainingConfig, TrainingReport


def train_from_annotations(
    annotations: Path,
    backbone: str,
    backbone_weights: Path | None,
    out: Path,
    config: TrainingConfig,
    dimensions: ModelDimensions | None = None,
) -> tuple[Captioner, TrainingReport]:
    """Train a captioner on a MILANNOTATIONS directory and write its checkpoint to `out`."""
    from services.captioner.backbones import build_encoder
    from services.captioner.checkpoint import save_checkpoint
    from services.captioner.milannotations import load_milannotations
    from services.captioner.training import train_captioner

    data = load_milannotations(annotations)
    encoder = build_encoder(backbone, backbone_weights)
    captioner, report = train_captioner(encoder, data, config, dimensions)
    atomic_write(out, lambda handle: save_checkpoint(captioner, handle))
    return captioner, report
