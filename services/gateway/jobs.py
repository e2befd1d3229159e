"""The job store and its state machine, persisted in the object store.

A job is one `Job` message stored as JSON (protobuf's JSON mapping, proto field
names) under `keys.job(job_id)`. Every state transition and every stage progress
update is written through before anyone is told about it, so a gateway killed at
any moment restarts from exactly what it last reported.

States move forward only:

```
QUEUED → EXTRACTING → EXPLAINING → CAPTIONING → REPORTING → SUCCEEDED
   (CAPTIONING is skipped when the spec asks for no captions)
any non-terminal state → FAILED | CANCELLED
```

An idempotency key maps (through `keys.idempotency`) to the job it created; a
resubmission with the same key and the same spec returns that job, unless it FAILED:
then `retry` queues the same job again (FAILED → QUEUED, the one way out of a
terminal state) as its next `attempt`, with the error it failed with kept in
`previous_error`. Its id is unchanged, so every stage finds and skips the work the
failed attempt stored.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TypeAlias

from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.common import keys
from services.common.errors import FailedPrecondition, NotFound
from services.common.metrics import JOBS
from services.common.store import ObjectStore

State: TypeAlias = common_pb2.JobState.ValueType

TERMINAL: frozenset[State] = frozenset(
    {common_pb2.SUCCEEDED, common_pb2.FAILED, common_pb2.CANCELLED}
)

_ORDER: list[State] = [
    common_pb2.QUEUED,
    common_pb2.EXTRACTING,
    common_pb2.EXPLAINING,
    common_pb2.CAPTIONING,
    common_pb2.REPORTING,
    common_pb2.SUCCEEDED,
]

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")


def state_name(state: State) -> str:
    """The enum name of a job state, e.g. 'EXPLAINING'."""
    return common_pb2.JobState.Name(state)


def legal_transition(current: State, new: State) -> bool:
    """Tell whether a job may move from `current` to `new`.

    Forward along QUEUED → … → SUCCEEDED (skipping stages is allowed, going back
    is not), and from any non-terminal state to FAILED or CANCELLED.
    """
    if current in TERMINAL:
        return False
    if new in (common_pb2.FAILED, common_pb2.CANCELLED):
        return True
    if current not in _ORDER or new not in _ORDER:
        return False
    return _ORDER.index(new) > _ORDER.index(current)


def is_before(state: State, other: State) -> bool:
    """Tell whether `state` comes strictly before `other` on the forward path."""
    return _ORDER.index(state) < _ORDER.index(other)


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it has the shape of a job id, else raise NotFound."""
    if not _JOB_ID.match(job_id):
        raise NotFound(f"no job {job_id!r} (job ids are 16 hex digits)", field="job_id")
    return job_id


def job_to_json(job: common_pb2.Job) -> dict[str, object]:
    """The stored JSON form of a job."""
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def job_from_json(data: dict[str, object]) -> common_pb2.Job:
    """Parse the stored JSON form of a job."""
    return json_format.ParseDict(data, common_pb2.Job())


class JobStore:
    """Jobs persisted in an object store, with change notification for watchers.

    One gateway process owns the jobs of a store. All writes go through this
    class, under one lock, and are written through to the store; reads answer from
    the copy this process holds of what it last wrote, so `status` and `jobs` answer
    while the store is unreachable. `wait_for_change` lets WatchJob streams sleep
    until a job they follow is written again.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.RLock()  # serializes writes (held while the store is written)
        self._changed = threading.Condition()  # its own lock: watchers never wait on a write
        self._versions: dict[str, int] = {}
        self._states: dict[str, State] = {}
        self._jobs: dict[str, bytes] = {}  # serialized, so readers never share a message
        for key in self.store.list(keys.jobs_prefix()):
            if key.endswith("/job.json"):
                job = job_from_json(self.store.get_json(key))
                self._states[job.id] = job.state
                self._jobs[job.id] = job.SerializeToString()
        self._publish_counts()

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> common_pb2.Job:
        """One job as last written; NotFound if there is none with that id."""
        check_job_id(job_id)
        data = self._jobs.get(job_id)
        if data is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return common_pb2.Job.FromString(data)

    def list(
        self, states: Iterable[State] = (), limit: int = 0
    ) -> list[common_pb2.Job]:
        """Jobs, newest first, optionally only those in `states`, at most `limit` (0 = all)."""
        wanted = set(states)
        jobs = []
        for data in list(self._jobs.values()):
            job = common_pb2.Job.FromString(data)
            if not wanted or job.state in wanted:
                jobs.append(job)
        jobs.sort(key=lambda j: (j.created_at.ToNanoseconds(), j.id), reverse=True)
        return jobs[:limit] if limit > 0 else jobs

    def find_by_idempotency_key(self, key: str) -> common_pb2.Job | None:
        """The job created with idempotency key `key`, if any."""
        try:
            record = self.store.get_json(keys.idempotency(key))
        except NotFound:
            return None
        return self.get(str(record["job_id"]))

    # -- writing ---------------------------------------------------------------------------

    def create(self, spec: common_pb2.DissectionSpec) -> common_pb2.Job:
        """Store a new QUEUED job for `spec` (and its idempotency record) and return it."""
        job = common_pb2.Job(id=uuid.uuid4().hex[:16], state=common_pb2.QUEUED, attempt=1)
        job.spec.CopyFrom(spec)
        job.created_at.GetCurrentTime()
        job.updated_at.CopyFrom(job.created_at)
        with self._lock:
            self._write(job)
            if spec.idempotency_key:
                self.store.put_json(
                    keys.idempotency(spec.idempotency_key), {"job_id": job.id}
                )
        return job

    def retry(self, job_id: str) -> common_pb2.Job:
        """Queue the FAILED job `job_id` again as its next attempt and return it.

        Raises FailedPrecondition for a job that is not FAILED.
        """
        with self._lock:
            job = self.get(job_id)
            if job.state != common_pb2.FAILED:
                raise FailedPrecondition(
                    f"job {job.id} is {state_name(job.state)}; only a FAILED job is retried",
                    field="idempotency_key",
                )
            job.attempt = max(job.attempt, 1) + 1
            job.previous_error = job.error
            job.error = ""
            job.state = common_pb2.QUEUED
            job.updated_at.GetCurrentTime()
            self._write(job)
        return job

    def save(self, job: common_pb2.Job) -> None:
        """Persist a job whose state did not change (keys, progress, summaries).

        Raises FailedPrecondition when the stored state differs from `job.state`
        (for example, the job was cancelled meanwhile): a stale copy never
        overwrites a newer state.
        """
        with self._lock:
            current = self.state(job.id)
            if current != job.state:
                raise FailedPrecondition(
                    f"job {job.id} is {state_name(current)}, not {state_name(job.state)}",
                    field="state",
                )
            job.updated_at.GetCurrentTime()
            self._write(job)

    def transition(
        self, job: common_pb2.Job, new: State, error: str = ""
    ) -> common_pb2.Job:
        """Move `job` to state `new` (legal transitions only) and persist it.

        `job` is updated in place and returned. Raises FailedPrecondition for an
        illegal transition, e.g. out of a terminal state.
        """
        with self._lock:
            current = self.state(job.id)
            if not legal_transition(current, new):
                raise FailedPrecondition(
                    f"job {job.id} cannot go from {state_name(current)} to {state_name(new)}",
                    field="state",
                )
            job.state = new
            if error:
                job.error = error
            job.updated_at.GetCurrentTime()
            self._write(job)
        return job

    def update_stage(
        self, job: common_pb2.Job, progress: common_pb2.StageProgress
    ) -> common_pb2.Job:
        """Replace (or add) the progress entry of `progress.stage` and persist the job."""
        for entry in job.stages:
            if entry.stage == progress.stage:
                entry.CopyFrom(progress)
                break
        else:
            job.stages.add().CopyFrom(progress)
        self.save(job)
        return job

    def state(self, job_id: str) -> State:
        """The current state of `job_id`; NotFound if there is no such job."""
        state = self._states.get(job_id)
        if state is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return state

    def _write(self, job: common_pb2.Job) -> None:
        self.store.put_json(keys.job(job.id), job_to_json(job))
        self._jobs[job.id] = job.SerializeToString()
        self._states[job.id] = job.state
        self._publish_counts()
        with self._changed:
            self._versions[job.id] = self._versions.get(job.id, 0) + 1
            self._changed.notify_all()

    def _publish_counts(self) -> None:
        counts = dict.fromkeys(common_pb2.JobState.values(), 0)
        for state in self._states.values():
            counts[state] += 1
        for state, count in counts.items():
            if state != common_pb2.JOB_STATE_UNSPECIFIED:
                JOBS.labels(state_name(state)).set(count)

    # -- watching --------------------------------------------------------------------------

    def version(self, job_id: str) -> int:
        """How many times this process has written `job_id` (0 if never)."""
        with self._changed:
            return self._versions.get(job_id, 0)

    def wait_for_change(self, job_id: str, seen: int, timeout: float) -> int:
        """Sleep until `job_id` is written after version `seen`, or `timeout` passes.

        Returns the current version.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._versions.get(job_id, 0) == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._versions.get(job_id, 0)
