"""The Captioner gRPC servicer: validate, gather exemplars from the store, decode, store.

`Caption` captions units [unit_start, unit_end) of one layer (`caption_layer`):

1. `plan_request` checks the request (errors name the field) and the checkpoint
   loads (`load_captioner`; FAILED_PRECONDITION when its backbone cannot be built).
2. Unit blocks whose units are all covered by stored result blocks are skipped,
   so a repeated or resumed call only does what is missing.
3. For each remaining block: its exemplars from the object store
   (`stored_exemplars`), thumbnails through the extractor's Materialize for the
   images not stored yet, then the frozen encoder turns them into (U, k, D)
   features.
4. The pending units are decoded as one batch (beam search under p(d|E), PMI
   rerank with p(d)). Only when the beams of more units would exceed
   `DECODE_ELEMENTS` scores per step is the batch flushed early, so memory stays
   bounded on wide layers.
5. One result block per unit block (`result_store.write_block`, method "milan"):
   `{"units": [{"unit": u, "caption": ..., "logp_caption": ..., "logp_lm": ...}]}`
   (MilanResult in protobuf's JSON mapping, proto field names), then the layer's
   `captions.csv` export (`layer,unit,description`, every stored unit) and summary
   are rewritten.

Progress is streamed after every block's exemplars and every stored block; the last
message has `finished=True`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf import json_format
from neurodissect.v1 import (
    captioner_pb2,
    captioner_pb2_grpc,
    common_pb2,
    extractor_pb2,
    extractor_pb2_grpc,
)
from torch import Tensor

from services.captioner.backbones import load_captioner
from services.captioner.caption_plan import CaptionPlan, plan_request
from services.captioner.captioner import Captioner, captions_csv
from services.captioner.decoding import CaptionResult, decode_units, evaluating
from services.captioner.stored_exemplars import (
    block_exemplars,
    missing_thumbnails,
    read_thumbnails,
)
from services.common.activations import read_pooled
from services.common.client import Peer, open_channel
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NeurodissectError,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from services.common.metrics import UNITS_CAPTIONED
from services.common.result_store import (
    block_ranges,
    read_rows,
    write_block,
    write_export,
    write_summary,
)
from services.common.settings import Settings
from services.common.spec_vocabulary import CAPTION_METHOD
from services.common.store import ObjectStore

log = logging.getLogger(__name__)

METHOD = CAPTION_METHOD
# Exemplar images encoded per backbone forward pass.
ENCODER_BATCH = 64
# Bound on (units × beam × vocabulary) decoded together: each beam-search step holds
# a few tensors of that many float32 scores (2^26 elements: 256 MiB each).
DECODE_ELEMENTS = 1 << 26
# Image ids per Materialize call.
MATERIALIZE_BATCH = 256

# Stores the thumbnails of the given probe image ids (`keys.thumbnail`), asking for
# the given side in pixels.
ThumbnailFetch = Callable[[CaptionPlan, Sequence[int], int], None]


def result_rows(u0: int, results: Sequence[CaptionResult]) -> list[dict[str, object]]:
    """Stored rows of units u0, u0+1, …: `{"unit": u, **MilanResult as JSON}`."""
    return [
        {
            "unit": u0 + i,
            **json_format.MessageToDict(
                common_pb2.MilanResult(
                    caption=r.caption, logp_caption=r.logp_caption, logp_lm=r.logp_lm
                ),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            ),
        }
        for i, r in enumerate(results)
    ]


def write_layer_outputs(store: ObjectStore, job_id: str, layer: str) -> None:
    """Rewrite the layer's captions.csv export and summary from every stored result block."""
    rows = read_rows(store, job_id, layer, METHOD)
    units = sorted(rows)
    text = captions_csv(layer, units, [str(rows[u].get("caption", "")) for u in units])
    write_export(store, job_id, layer, METHOD, text)
    write_summary(store, job_id, layer, METHOD, {"units": len(rows)})


def encode_block(
    captioner: Captioner, thumbnails: np.ndarray, image_index: np.ndarray, masks: np.ndarray
) -> Tensor:
    """Encoder features of a block's exemplars: (U, k, D) float on the encoder's device.

    thumbnails: (n, 3, S, S) uint8 distinct images; image_index: (U, k) rows of
    `thumbnails`; masks: (U, k, 1, S, S) uint8. A few units are made float at a time.
    """
    units, k = image_index.shape
    step = max(1, ENCODER_BATCH // k)
    parts = []
    with evaluating(captioner.encoder):
        for a in range(0, units, step):
            images = torch.from_numpy(thumbnails[image_index[a : a + step]]).float().div_(255.0)
            unit_masks = torch.from_numpy(masks[a : a + step]).float()
            parts.append(captioner.encoder.encode_units(images, unit_masks, ENCODER_BATCH))
    return torch.cat(parts)


@dataclass
class _Pending:
    """Encoded blocks waiting to be decoded together."""

    blocks: list[tuple[int, int]]
    features: list[Tensor]

    @property
    def units(self) -> int:
        return sum(u1 - u0 for u0, u1 in self.blocks)


def caption_layer(
    plan: CaptionPlan,
    store: ObjectStore,
    captioner: Captioner,
    fetch_thumbnails: ThumbnailFetch,
    is_active: Callable[[], bool] = lambda: True,
) -> Iterator[captioner_pb2.CaptionProgress]:
    """Caption the plan's units that are not stored yet; yield progress, then `finished`.

    Raises `Cancelled` once `is_active()` turns false.
    """
    total = plan.units_total
    stored = {
        u
        for b0, b1, _ in block_ranges(store, plan.job_id, plan.layer, METHOD)
        for u in range(b0, b1)
    }
    todo = [(u0, u1) for u0, u1 in plan.blocks() if not set(range(u0, u1)) <= stored]
    done = total - sum(u1 - u0 for u0, u1 in todo)

    def progress(message: str, finished: bool = False) -> captioner_pb2.CaptionProgress:
        return captioner_pb2.CaptionProgress(
            units_done=done, units_total=total, message=message, finished=finished
        )

    yield progress(f"{done} of {total} units already captioned" if done else "starting")
    size = captioner.encoder.description.input_size
    batch_units = max(1, DECODE_ELEMENTS // (plan.beam * len(captioner.vocabulary)))
    pending = _Pending([], [])

    def flush() -> Iterator[captioner_pb2.CaptionProgress]:
        nonlocal done
        results = decode_units(
            captioner.decoder,
            captioner.language_model,
            torch.cat(pending.features),
            plan.beam,
            plan.max_tokens,
            plan.pmi_lambda,
        )
        offset = 0
        for u0, u1 in pending.blocks:
            rows = result_rows(u0, results[offset : offset + u1 - u0])
            offset += u1 - u0
            write_block(store, plan.job_id, plan.layer, METHOD, u0, u1, rows)
            UNITS_CAPTIONED.inc(u1 - u0)
            done += u1 - u0
            yield progress(f"captioned units {u0}-{u1}")
        pending.blocks.clear()
        pending.features.clear()

    # (N, U) spatial maxima, read only when there is work to do.
    unit_max = read_pooled(store, plan.manifest.acts_key, plan.layer)[1] if todo else np.empty(0)
    for u0, u1 in todo:
        if not is_active():
            raise Cancelled("the client cancelled the call")
        if pending.blocks and pending.units + (u1 - u0) > batch_units:
            yield from flush()
        exemplars = block_exemplars(
            store, plan.manifest, unit_max, u0, u1, plan.exemplars, plan.mask_quantile
        )
        distinct, image_index = np.unique(exemplars.image_ids, return_inverse=True)
        ids = distinct.tolist()
        missing = missing_thumbnails(store, plan.dataset_key, ids, size)
        if missing:
            fetch_thumbnails(plan, missing, size)
        thumbnails = read_thumbnails(store, plan.dataset_key, ids, size)
        pending.blocks.append((u0, u1))
        pending.features.append(
            encode_block(
                captioner,
                thumbnails,
                image_index.reshape(exemplars.image_ids.shape),
                exemplars.masks(size),
            )
        )
        yield progress(f"exemplars of units {u0}-{u1}")
    if pending.blocks:
        yield from flush()
    write_layer_outputs(store, plan.job_id, plan.layer)
    yield progress("done", finished=True)


# Extractor status codes → the error this service reports (others: UNAVAILABLE).
_PEER_ERRORS: dict[grpc.StatusCode, type[NeurodissectError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


class ExtractorThumbnails:
    """Stores thumbnails through the extractor's Materialize (deadlines, token, retries)."""

    def __init__(self, settings: Settings) -> None:
        # The channel connects on first use, so the extractor need not be up yet.
        channel = open_channel(settings.extractor_addr, settings)
        self.extractor = Peer(extractor_pb2_grpc.ExtractorStub(channel), settings)

    def __call__(self, plan: CaptionPlan, image_ids: Sequence[int], size: int) -> None:
        """Materialize `image_ids` of the plan's dataset, longer side `size` pixels."""
        if plan.dataset is None:
            raise InvalidArgument(
                f"{len(image_ids)} exemplar thumbnails are not stored yet; the probe dataset "
                "is needed to materialize them",
                "dataset",
            )
        for i in range(0, len(image_ids), MATERIALIZE_BATCH):
            request = extractor_pb2.MaterializeRequest(
                dataset=plan.dataset,
                dataset_key=plan.dataset_key,
                image_ids=image_ids[i : i + MATERIALIZE_BATCH],
                size=size,
            )
            try:
                self.extractor.unary("Materialize", request)
            except grpc.RpcError as exc:
                error = _PEER_ERRORS.get(exc.code(), Unavailable)
                raise error(f"extractor Materialize: {exc.details()}", "dataset") from exc


class CaptionerServicer(captioner_pb2_grpc.CaptionerServicer):
    """Serves Caption over one object store; thumbnails come from the extractor."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore | None = None,
        fetch_thumbnails: ThumbnailFetch | None = None,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else settings.open_store()
        self.fetch_thumbnails = fetch_thumbnails or ExtractorThumbnails(settings)

    def Caption(  # noqa: N802 (gRPC method name)
        self, request: captioner_pb2.CaptionRequest, context: grpc.ServicerContext
    ) -> Iterator[captioner_pb2.CaptionProgress]:
        """Caption units [unit_start, unit_end) of one layer; stream progress."""
        plan = plan_request(self.store, request, self.settings)
        captioner = load_captioner(plan.checkpoint, plan.device)
        log.info(
            "caption job %s layer %s units %d-%d with %s",
            plan.job_id,
            plan.layer,
            plan.unit_start,
            plan.unit_end,
            plan.checkpoint,
        )
        try:
            yield from caption_layer(
                plan, self.store, captioner, self.fetch_thumbnails, context.is_active
            )
        except (GeneratorExit, Cancelled):
            log.info("caption job %s layer %s cancelled by the client", plan.job_id, plan.layer)
            raise
