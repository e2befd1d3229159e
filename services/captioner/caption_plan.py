"""A CaptionRequest checked against the object store and resolved into a `CaptionPlan`.

Every check names the offending field: INVALID_ARGUMENT for a value outside what is
allowed (the MILAN parameters are named as in the DissectionSpec, `milan.beam`, …),
NOT_FOUND for inputs that do not exist (the checkpoint file, the stored
activations), FAILED_PRECONDITION for a device this server does not have. Zero or
unset parameters take the spec's defaults.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from neurodissect.v1 import captioner_pb2, common_pb2

from services.captioner.checkpoint import TOY_CHECKPOINT
from services.common.activations import (
    ActivationManifest,
    check_name,
    requested_manifest,
    requested_units,
)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    MASK_QUANTILE,
    MILAN_BEAM,
    MILAN_EXEMPLARS,
    MILAN_MAX_TOKENS,
    PMI_LAMBDA,
    UNIT_BLOCK,
    IntField,
)
from services.common.store import ObjectStore

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class CaptionPlan:
    """What one Caption call does: a layer's unit range, its inputs and the MILAN parameters."""

    job_id: str
    layer: str
    manifest: ActivationManifest
    dataset_key: str
    dataset: common_pb2.DatasetSpec | None  # for Materialize; None when not given
    checkpoint: Path
    beam: int
    max_tokens: int
    pmi_lambda: float
    exemplars: int
    mask_quantile: float
    unit_start: int
    unit_end: int
    block_size: int
    device: str

    @property
    def units_total(self) -> int:
        """Number of requested units."""
        return self.unit_end - self.unit_start

    def blocks(self) -> list[tuple[int, int]]:
        """The requested unit blocks [u0, u1), aligned to multiples of `block_size`."""
        edges = [self.unit_start]
        edges += range(
            (self.unit_start // self.block_size + 1) * self.block_size,
            self.unit_end,
            self.block_size,
        )
        return list(zip(edges, [*edges[1:], self.unit_end], strict=True))


def _count(value: int, spec_field: IntField, field: str) -> int:
    if not 0 <= value <= spec_field.high:
        raise InvalidArgument(
            f"{value} is outside [1, {spec_field.high}] (0 = {spec_field.default})", field
        )
    return spec_field.value(value)


def checkpoint_path(uri: str, settings: Settings) -> Path:
    """The local checkpoint file a `milan.checkpoint_uri` names ("toy": the toy captioner)."""
    field = "milan.checkpoint_uri"
    if not uri:
        raise InvalidArgument(
            f"a captioner checkpoint is required ('{TOY_CHECKPOINT}' for the toy captioner, "
            "or a local file)",
            field,
        )
    if uri == TOY_CHECKPOINT:
        from services.captioner.toy_captioner import toy_captioner  # only when asked for

        return toy_captioner(Path(settings.cache_dir))
    raw = uri.removeprefix("file://")
    if "://" in raw or "\x00" in raw:
        raise InvalidArgument(f"{uri!r}: only local paths or file:// URIs are supported", field)
    path = Path(raw).expanduser()
    if ".." in path.parts:
        raise InvalidArgument(f"{uri!r}: paths may not contain '..'", field)
    path = path.resolve()
    roots = [Path(r).resolve() for r in re.split(f"[,{os.pathsep}]", settings.data_roots) if r]
    if roots and not any(path.is_relative_to(root) for root in roots):
        raise InvalidArgument(f"{uri!r} is outside the allowed data roots", field)
    if not path.is_file():
        raise NotFound(f"no checkpoint file at {uri!r}", field)
    return path


def _device(requested: str, settings: Settings) -> str:
    device = requested or settings.device
    if not _DEVICE.match(device):
        raise InvalidArgument(f"{device!r} is not 'cpu', 'cuda' or 'cuda:N'", "compute.device")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise FailedPrecondition(f"this captioner has no device {device!r}", "compute.device")
    return device


def plan_request(
    store: ObjectStore, request: captioner_pb2.CaptionRequest, settings: Settings
) -> CaptionPlan:
    """Check `request` against the store and settings; return its plan or raise naming the field."""
    job_id = check_name(request.job_id, "job_id")
    layer = check_name(request.layer, "layer")
    acts_key = check_name(request.acts_key, "acts_key")
    params = request.params
    beam = _count(params.beam, MILAN_BEAM, "milan.beam")
    max_tokens = _count(params.max_tokens, MILAN_MAX_TOKENS, "milan.max_tokens")
    pmi_lambda = params.pmi_lambda if params.HasField("pmi_lambda") else PMI_LAMBDA.default
    if not (math.isfinite(pmi_lambda) and pmi_lambda >= 0.0):
        raise InvalidArgument(f"{pmi_lambda} must be finite and ≥ 0", "milan.pmi_lambda")
    quantile = (
        params.mask_quantile if params.HasField("mask_quantile") else MASK_QUANTILE.default
    )
    if not (math.isfinite(quantile) and 0.0 < quantile < 1.0):
        raise InvalidArgument(f"{quantile} is not strictly between 0 and 1", "milan.mask_quantile")
    if not 0 <= params.exemplars <= MILAN_EXEMPLARS.high:
        raise InvalidArgument(
            f"{params.exemplars} is outside [1, {MILAN_EXEMPLARS.high}]"
            f" (0 = {MILAN_EXEMPLARS.default})",
            "milan.exemplars",
        )
    manifest = requested_manifest(store, acts_key, layer, request.dataset_key)
    dataset_key = manifest.dataset_key
    # Default: 15 exemplars, or every image of a smaller probe set.
    exemplars = params.exemplars or min(MILAN_EXEMPLARS.default, manifest.n_images)
    if exemplars > manifest.n_images:
        raise InvalidArgument(
            f"{exemplars} exemplars asked for but the probe set has {manifest.n_images} images",
            "milan.exemplars",
        )
    unit_start, unit_end = requested_units(request.unit_start, request.unit_end, manifest)
    block_size = request.compute.unit_block_size or manifest.unit_block
    if not 1 <= block_size <= UNIT_BLOCK.high:
        raise InvalidArgument(
            f"{block_size} is outside [1, {UNIT_BLOCK.high}] (0 = the stored block size)",
            "compute.unit_block_size",
        )
    return CaptionPlan(
        job_id=job_id,
        layer=layer,
        manifest=manifest,
        dataset_key=dataset_key,
        dataset=request.dataset if request.HasField("dataset") else None,
        checkpoint=checkpoint_path(params.checkpoint_uri, settings),
        beam=beam,
        max_tokens=max_tokens,
        pmi_lambda=pmi_lambda,
        exemplars=exemplars,
        mask_quantile=quantile,
        unit_start=unit_start,
        unit_end=unit_end,
        block_size=block_size,
        device=_device(request.compute.device, settings),
    )
