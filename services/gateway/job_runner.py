"""Runs jobs through their stages (`stages.PIPELINE`), at most `max_concurrent_jobs` at a time.

A FIFO queue of job ids and one thread per running job. Each run walks the
pipeline with a `StageContext`; a stage's failure marks the job FAILED naming the
stage. A peer that is UNAVAILABLE is retried with backoff for `retry_budget_s`; a
stage stream that brings no progress for `stage_no_progress_s` is cancelled by the
run's `ProgressWatchdog` and called again, up to `stage_no_progress_retries` times
(`StageContext.retrying`). CancelJob marks the job CANCELLED and cancels the
in-flight RPC. On start, `resume` queues every stored job that is not terminal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque

from neurodissect.v1 import common_pb2

from services.common.errors import FailedPrecondition, NeurodissectError
from services.common.metrics import JOB_ETA, JOB_LAST_PROGRESS, JOB_PROGRESS, QUEUE_LENGTH
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.gateway.jobs import TERMINAL, JobStore
from services.gateway.peers import Peers
from services.gateway.stage_context import JobRun, StageContext, Stopped
from services.gateway.stages import PIPELINE

log = logging.getLogger(__name__)


class JobRunner:
    """A FIFO queue of jobs and the threads that run them through their stages."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        jobs: JobStore,
        peers: Peers,
        retry_budget_s: float = 300.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.peers = peers
        self.retry_budget_s = retry_budget_s
        self._lock = threading.Lock()
        self._queue: deque[str] = deque()
        self._running: dict[str, JobRun] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False

    # -- queue -----------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        """Put a job at the end of the queue and start it when a slot is free."""
        with self._lock:
            if job_id in self._queue or job_id in self._running:
                return
            self._queue.append(job_id)
            self._pump()

    def resume(self) -> list[str]:
        """Queue every stored job that is not terminal, oldest first; return their ids."""
        pending = [job for job in self.jobs.list() if job.state not in TERMINAL]
        pending.sort(key=lambda j: (j.created_at.ToNanoseconds(), j.id))
        for job in pending:
            log.info("resuming job %s from %s", job.id, common_pb2.JobState.Name(job.state))
            self.enqueue(job.id)
        return [job.id for job in pending]

    def queued(self) -> int:
        """How many jobs wait for a slot."""
        with self._lock:
            return len(self._queue)

    def cancel(self, job_id: str) -> common_pb2.Job:
        """Mark a job CANCELLED and stop its in-flight RPC; a terminal job is left as it is."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job.state in TERMINAL:
                return job
            self.jobs.transition(job, common_pb2.CANCELLED, error="cancelled by the user")
            with contextlib.suppress(ValueError):
                self._queue.remove(job_id)
            QUEUE_LENGTH.set(len(self._queue))
            run = self._running.get(job_id)
        if run is not None:
            run.stop()
        self._clear_metrics(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Stop every run without changing its stored state (it resumes on the next start)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            runs = list(self._running.values())
            threads = list(self._threads)
        for run in runs:
            run.stop()
        for thread in threads:
            thread.join(timeout)

    def _store_out(self) -> bool:
        return self.store.outage_since is not None

    def _pump(self) -> None:
        # Called with the lock held.
        while (
            not self._closed
            and self._queue
            and len(self._running) < max(1, self.settings.max_concurrent_jobs)
        ):
            run = JobRun(self._queue.popleft(), self.settings.stage_no_progress_s, self._store_out)
            self._running[run.job_id] = run
            thread = threading.Thread(
                target=self._run, args=(run,), name=f"job-{run.job_id}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        QUEUE_LENGTH.set(len(self._queue))

    def _run(self, run: JobRun) -> None:
        try:
            self._execute(run)
        finally:
            with self._lock:
                self._running.pop(run.job_id, None)
                self._pump()

    # -- one job ---------------------------------------------------------------------------

    def _execute(self, run: JobRun) -> None:
        job = self.jobs.get(run.job_id)
        if job.state in TERMINAL:
            return
        ctx = StageContext(
            self.settings, self.store, self.jobs, self.peers, self.retry_budget_s, run, job
        )
        stage = PIPELINE[0][0]
        try:
            for name, step in PIPELINE:
                stage = name
                step(ctx)
            ctx.transition(common_pb2.SUCCEEDED)
            log.info("job %s succeeded", job.id)
        except Stopped:
            log.info("job %s stopped in stage %s", job.id, stage)
            return
        except NeurodissectError as exc:
            self._fail(job, f"{stage}: {exc}")
        except Exception as exc:
            log.exception("job %s: stage %s failed", job.id, stage)
            self._fail(job, f"{stage}: internal error: {type(exc).__name__}: {exc}")
        self._clear_metrics(job)

    def _fail(self, job: common_pb2.Job, message: str) -> None:
        log.warning("job %s failed: %s", job.id, message)
        with contextlib.suppress(FailedPrecondition):
            self.jobs.transition(job, common_pb2.FAILED, error=message)

    def _clear_metrics(self, job: common_pb2.Job) -> None:
        for stage in {name for name, _ in PIPELINE}:
            with contextlib.suppress(KeyError):
                JOB_PROGRESS.remove(job.id, stage)
        for gauge in (JOB_ETA, JOB_LAST_PROGRESS):
            with contextlib.suppress(KeyError):
                gauge.remove(job.id)
