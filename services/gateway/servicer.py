"""The Gateway gRPC service: thin handlers over the job store, job runner and results.

Handlers raise the project's errors; `services.common.server` maps them to status
codes.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator

import grpc
from neurodissect.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.result_store import read_export
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.gateway import results
from services.gateway.job_runner import JobRunner
from services.gateway.jobs import TERMINAL, JobStore
from services.gateway.peers import Peers
from services.gateway.store_watch import StoreWatch
from services.gateway.validation import SpecValidator, with_defaults

# How often a WatchJob stream re-checks that its client is still there (and the store).
WATCH_POLL_S = 1.0
# Share of the RPC deadline a call may spend retrying the store before it answers UNAVAILABLE.
STORE_SHARE = 0.8


# Bytes of an export file per ExportChunk message (well below gRPC's 4 MiB limit).
EXPORT_CHUNK_BYTES = 1 << 20


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Submit, watch and cancel dissections; read their results."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        jobs: JobStore,
        runner: JobRunner,
        peers: Peers,
        store_watch: StoreWatch,
    ) -> None:
        self.settings = settings
        self.store = store
        self.store_watch = store_watch
        self.jobs = jobs
        self.runner = runner
        self.peers = peers
        self.validator = SpecValidator(settings, peers.describe_model)
        self._submit_lock = threading.Lock()

    def _existing(self, spec: common_pb2.DissectionSpec) -> common_pb2.Job | None:
        if not spec.idempotency_key:
            return None
        job = self.jobs.find_by_idempotency_key(spec.idempotency_key)
        if job is not None and job.spec != with_defaults(spec):
            raise AlreadyExists(
                f"already used by job {job.id} with a different spec", field="idempotency_key"
            )
        return job

    def SubmitDissection(  # noqa: N802
        self, request: common_pb2.DissectionSpec, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        """Validate a spec, store a QUEUED job and queue it (or return the idempotent twin).

        During a store outage it fails fast with UNAVAILABLE, and a store that stops
        answering meanwhile is retried only within the RPC deadline.
        """
        self.store_watch.check_reachable()
        with self.store.deadline(self.settings.rpc_timeout_s * STORE_SHARE):
            return self._submit(request)

    def _submit(self, request: common_pb2.DissectionSpec) -> common_pb2.Job:
        """A new job, the idempotent twin, or the twin's retry when it FAILED (validated anew)."""
        existing = self._existing(request)
        if existing is not None and existing.state != common_pb2.FAILED:
            return existing
        spec, _ = self.validator.validate(request)
        with self._submit_lock:
            existing = self._existing(request)
            if existing is not None and existing.state != common_pb2.FAILED:
                return existing
            if self.runner.queued() >= self.settings.max_queued_jobs:
                raise ResourceExhausted(
                    f"{self.runner.queued()} jobs are already waiting"
                    f" (limit {self.settings.max_queued_jobs}); try again later"
                )
            job = self.jobs.retry(existing.id) if existing is not None else self.jobs.create(spec)
        self.runner.enqueue(job.id)
        return job

    def GetJob(  # noqa: N802
        self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        """The job as last stored, saying so when it waits for the object store."""
        return self.store_watch.decorate(self.jobs.get(request.job_id))

    def WatchJob(  # noqa: N802
        self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.JobEvent]:
        """Stream the job on every change (state, progress, ETA) until it is terminal."""
        seen = self.jobs.version(request.job_id)
        job = self.store_watch.decorate(self.jobs.get(request.job_id))
        yield gateway_pb2.JobEvent(job=job)
        while job.state not in TERMINAL and context.is_active():
            version = self.jobs.wait_for_change(job.id, seen, WATCH_POLL_S)
            latest = self.store_watch.decorate(self.jobs.get(job.id))
            if version != seen or latest != job:  # written, or the store went or came back
                seen, job = version, latest
                yield gateway_pb2.JobEvent(job=job)

    def ListJobs(  # noqa: N802
        self, request: gateway_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListJobsResponse:
        """Jobs, newest first, optionally filtered by state."""
        if request.limit < 0:
            raise InvalidArgument(f"{request.limit} is negative (0 = all)", field="limit")
        jobs = self.jobs.list(states=request.states, limit=request.limit)
        return gateway_pb2.ListJobsResponse(jobs=[self.store_watch.decorate(job) for job in jobs])

    def CancelJob(  # noqa: N802
        self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        """Cancel a queued or running job; a finished job is returned unchanged."""
        return self.runner.cancel(request.job_id)

    def _layer(self, job: common_pb2.Job, layer: str) -> str:
        if not layer and len(job.spec.layers) == 1:
            return job.spec.layers[0]
        if layer in job.spec.layers:
            return layer
        listed = ", ".join(repr(name) for name in job.spec.layers)
        close = difflib.get_close_matches(layer, list(job.spec.layers), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if not layer:
            raise InvalidArgument(f"required; job {job.id} has layers {listed}", field="layer")
        raise NotFound(f"job {job.id} has no layer {layer!r} (it has {listed}){hint}", "layer")

    def ListUnits(  # noqa: N802
        self, request: gateway_pb2.ListUnitsRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.UnitResult]:
        """Stream the merged answers of every unit of a layer that passes the filters."""
        job = self.jobs.get(request.job_id)
        layer = self._layer(job, request.layer)
        if request.unit_start < 0:
            raise InvalidArgument(f"{request.unit_start} is negative", field="unit_start")
        if request.unit_end < 0 or (request.unit_end and request.unit_end <= request.unit_start):
            raise InvalidArgument(
                f"{request.unit_end} must be 0 (to the last unit) or above unit_start",
                field="unit_end",
            )
        if not 0.0 <= request.min_iou <= 1.0:
            raise InvalidArgument(f"{request.min_iou} is outside [0, 1]", field="min_iou")
        with self.store.deadline(self.settings.rpc_timeout_s * STORE_SHARE):
            units = results.unit_results(
                self.store, job.id, layer, request.unit_start, request.unit_end
            )
        for unit in units:
            if results.matches(unit, request):
                yield unit

    def GetUnit(  # noqa: N802
        self, request: gateway_pb2.GetUnitRequest, context: grpc.ServicerContext
    ) -> common_pb2.UnitResult:
        """Every method's answer for one unit."""
        job = self.jobs.get(request.job_id)
        layer = self._layer(job, request.layer)
        if request.unit < 0:
            raise InvalidArgument(f"{request.unit} is negative", field="unit")
        with self.store.deadline(self.settings.rpc_timeout_s * STORE_SHARE):
            found = results.unit_results(
                self.store, job.id, layer, request.unit, request.unit + 1
            )
        if not found:
            raise NotFound(f"no results for unit {request.unit} of layer {layer!r} yet", "unit")
        return found[0]

    def DescribeModel(  # noqa: N802
        self, request: common_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> common_pb2.DescribeModelResponse:
        """The model's layers and their output shapes, from the extractor."""
        self.validator.check_model(request.model)
        return self.peers.describe_model(request.model)

    def ExportLayer(  # noqa: N802
        self, request: gateway_pb2.ExportRequest, context: grpc.ServicerContext
    ) -> Iterator[gateway_pb2.ExportChunk]:
        """A layer's export file as its method stored it, in chunks."""
        job = self.jobs.get(request.job_id)
        data = read_export(self.store, job.id, self._layer(job, request.layer), request.format)
        for start in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield gateway_pb2.ExportChunk(data=data[start : start + EXPORT_CHUNK_BYTES])
