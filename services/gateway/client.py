"""The Python client: the CLI's operations as methods.

```python
from services.gateway.client import NeurodissectClient

with NeurodissectClient() as client:              # settings from NEURODISSECT_* variables
    job = client.submit("spec.yaml")               # a file, a dict or a DissectionSpec
    job = client.wait(job.id)                      # follows WatchJob until terminal
    rows = client.results(job.id, layer="conv3")   # [{"unit": 0, "netdissect": {...}, ...}]
```

Every call has a deadline (`settings.rpc_timeout_s`; DescribeModel and submit, which
may wait for a model to load, and streams a longer one) and
carries the bearer token; TLS is used when the settings name certificates.
Unary calls are retried on UNAVAILABLE. `submit` gives a spec without an
idempotency key a fresh one, so that such a retry can never create two jobs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from neurodissect.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from services.common.client import call_metadata, open_channel, with_retry
from services.common.settings import Settings
from services.gateway import results
from services.gateway.jobs import TERMINAL
from services.gateway.peers import DESCRIBE_TIMEOUT_S
from services.gateway.spec_file import load_spec, spec_from_dict

# Deadline of a WatchJob or ListUnits stream.
STREAM_TIMEOUT_S = 7 * 24 * 3600.0
# Times in a row a broken WatchJob stream is opened again before giving up.
WATCH_RECONNECTS = 8


class NeurodissectClient:
    """A connection to the gateway with the same operations as the `neurodissect` CLI."""

    def __init__(self, settings: Settings | None = None, address: str = "") -> None:
        self.settings = settings or Settings.load()
        self.address = address or self.settings.gateway_addr
        self.channel = open_channel(self.address, self.settings)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.metadata = call_metadata(self.settings)

    def __enter__(self) -> NeurodissectClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _unary(self, method: str, request: Any, timeout: float = 0.0) -> Any:
        call = getattr(self.stub, method)
        deadline = max(timeout, self.settings.rpc_timeout_s)
        return with_retry(lambda: call(request, timeout=deadline, metadata=self.metadata))

    def submit(
        self, spec: common_pb2.DissectionSpec | Mapping[str, Any] | str | Path
    ) -> common_pb2.Job:
        """Submit a dissection: a DissectionSpec, a dict in JSON mapping, or a spec file."""
        if isinstance(spec, str | Path):
            message = load_spec(spec)
        elif isinstance(spec, common_pb2.DissectionSpec):
            message = common_pb2.DissectionSpec()
            message.CopyFrom(spec)
        else:
            message = spec_from_dict(spec)
        if not message.idempotency_key:
            message.idempotency_key = f"client-{uuid.uuid4().hex}"
        job: common_pb2.Job = self._unary("SubmitDissection", message, DESCRIBE_TIMEOUT_S)
        return job

    def get(self, job_id: str) -> common_pb2.Job:
        """The job as stored now."""
        job: common_pb2.Job = self._unary("GetJob", gateway_pb2.GetJobRequest(job_id=job_id))
        return job

    def watch(self, job_id: str) -> Iterator[common_pb2.Job]:
        """The job on every change (state, progress, ETA) until it is terminal.

        A stream broken by UNAVAILABLE (a gateway restart, a dropped connection) is
        opened again; the first event after that is the job as it is then.
        """
        request = gateway_pb2.GetJobRequest(job_id=job_id)
        failures = 0
        while True:
            try:
                for event in self.stub.WatchJob(
                    request, timeout=STREAM_TIMEOUT_S, metadata=self.metadata
                ):
                    failures = 0
                    yield event.job
                return
            except grpc.RpcError as exc:
                failures += 1
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures > WATCH_RECONNECTS:
                    raise
                time.sleep(min(5.0, 0.2 * 2**failures))

    def wait(self, job_id: str) -> common_pb2.Job:
        """Follow the job until it is terminal and return it."""
        job = self.get(job_id)
        for job in self.watch(job_id):
            if job.state in TERMINAL:
                break
        return job

    def jobs(
        self, states: Iterable[common_pb2.JobState.ValueType] = (), limit: int = 0
    ) -> list[common_pb2.Job]:
        """Jobs, newest first."""
        request = gateway_pb2.ListJobsRequest(states=list(states), limit=limit)
        response: gateway_pb2.ListJobsResponse = self._unary("ListJobs", request)
        return list(response.jobs)

    def cancel(self, job_id: str) -> common_pb2.Job:
        """Cancel a queued or running job."""
        job: common_pb2.Job = self._unary("CancelJob", gateway_pb2.GetJobRequest(job_id=job_id))
        return job

    def units(
        self,
        job_id: str,
        layer: str = "",
        *,
        detectors_only: bool = False,
        label: str = "",
        min_iou: float = 0.0,
        significant_only: bool = False,
        unit_start: int = 0,
        unit_end: int = 0,
    ) -> Iterator[common_pb2.UnitResult]:
        """Stream the units of a layer with every method's answer, filtered."""
        request = gateway_pb2.ListUnitsRequest(
            job_id=job_id,
            layer=layer,
            detectors_only=detectors_only,
            label=label,
            min_iou=min_iou,
            significant_only=significant_only,
            unit_start=unit_start,
            unit_end=unit_end,
        )
        yield from self.stub.ListUnits(request, timeout=STREAM_TIMEOUT_S, metadata=self.metadata)

    def unit(self, job_id: str, layer: str, unit: int) -> common_pb2.UnitResult:
        """Every method's answer for one unit."""
        request = gateway_pb2.GetUnitRequest(job_id=job_id, layer=layer, unit=unit)
        result: common_pb2.UnitResult = self._unary("GetUnit", request)
        return result

    def describe_model(
        self, model: common_pb2.ModelSpec | Mapping[str, Any]
    ) -> common_pb2.DescribeModelResponse:
        """The model's layers and output shapes."""
        if not isinstance(model, common_pb2.ModelSpec):
            model = json_format.ParseDict(dict(model), common_pb2.ModelSpec())
        response: common_pb2.DescribeModelResponse = self._unary(
            "DescribeModel", common_pb2.DescribeModelRequest(model=model), DESCRIBE_TIMEOUT_S
        )
        return response

    def results(self, job_id: str, layer: str = "", **filters: Any) -> list[dict[str, Any]]:
        """One dict per unit: `{"unit": 0, "netdissect": {...}, ...}`, a key per method that ran."""
        return [results.unit_dict(u) for u in self.units(job_id, layer, **filters)]

    def export(self, job_id: str, layer: str, export_format: str) -> str:
        """A layer's export file as its method stored it (`spec_vocabulary.EXPORT_FORMATS`).

        `tally`: NetDissect-Lite's tally.csv with its pixel counts; `clip_dissect`:
        `layer,unit,description,similarity`; `milan`: `layer,unit,description`.
        """
        request = gateway_pb2.ExportRequest(job_id=job_id, layer=layer, format=export_format)
        chunks = self.stub.ExportLayer(request, timeout=STREAM_TIMEOUT_S, metadata=self.metadata)
        return b"".join(chunk.data for chunk in chunks).decode()
