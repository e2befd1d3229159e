"""What every stage of a running job works with: its run, its peers, its store and its clock.

`JobRun` is one job being run (its stop flag, the RPC it waits on, its progress
watchdog). `StageContext` hands a stage the job and the plumbing every stage
shares: entering a state, saving progress, streaming a peer's RPC under the
watchdog, retrying an unavailable peer with backoff, and calling Explain on a
layer. A stage function (`services/gateway/stages/`) is written against it alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common.activations import read_manifest
from services.common.client import Peer
from services.common.errors import Cancelled, FailedPrecondition, NotFound, Unavailable
from services.common.metrics import JOB_ETA, JOB_LAST_PROGRESS, JOB_PROGRESS
from services.common.result_store import covered
from services.common.settings import Settings
from services.common.store import ObjectStore
from services.gateway.jobs import JobStore, State, is_before
from services.gateway.peers import Peers, peer_error
from services.gateway.progress_watchdog import Cancellable, ProgressWatchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deadline of one stage RPC (a whole layer's explanation can take hours at scale).
STAGE_DEADLINE_S = 24 * 3600.0
# Backoff of calls to an unavailable peer; an attempt that streamed progress before it
# failed starts the backoff and the retry budget afresh.
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 15.0


class Stopped(Exception):
    """The run was cancelled or the gateway is shutting down: leave the job as stored."""


class StageStalled(Unavailable):
    """A stage's peer streamed no progress for `stage_no_progress_s`."""


class JobRun:
    """One job being run: its stop flag, the RPCs it is waiting on and its progress watchdog.

    Usually one RPC is in flight; a sharded extraction has one per extractor replica.
    """

    def __init__(
        self, job_id: str, no_progress_s: float, outage: Callable[[], bool] = lambda: False
    ) -> None:
        self.job_id = job_id
        self.stopped = threading.Event()
        self.no_progress_s = no_progress_s
        self.outage = outage
        self.progress = ProgressWatchdog(no_progress_s, outage)
        self._lock = threading.Lock()
        self._calls: list[Cancellable] = []

    def attach(self, call: Cancellable) -> None:
        """Record an in-flight call; cancel it at once if stopped."""
        with self._lock:
            self._calls.append(call)
            if self.stopped.is_set():
                call.cancel()

    def detach(self, call: Cancellable) -> None:
        """Forget a call that is done."""
        with self._lock:
            self._calls.remove(call)

    def stop(self) -> None:
        """Ask the run to stop and cancel its in-flight calls."""
        with self._lock:
            self.stopped.set()
            for call in self._calls:
                call.cancel()

    def check(self) -> None:
        """Raise Stopped if the run was asked to stop."""
        if self.stopped.is_set():
            raise Stopped()


class StageClock:
    """Rate and ETA of one stage, measured from the first progress it saw."""

    def __init__(self, stage: str, unit: str) -> None:
        self.stage = stage
        self.unit = unit
        self.started = time.monotonic()
        self.first_done: int | None = None

    def progress(self, done: int, total: int, message: str = "") -> common_pb2.StageProgress:
        """The StageProgress for `done` of `total` items now."""
        if self.first_done is None:
            self.first_done = done
        elapsed = time.monotonic() - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        return common_pb2.StageProgress(
            stage=self.stage,
            done=done,
            total=total,
            rate=rate,
            eta_seconds=max(eta, 0.0),
            unit=self.unit,
            message=message,
        )


@dataclass
class StageContext:
    """One job's run as its stages see it; `image_keys` is filled by the extract stage."""

    settings: Settings
    store: ObjectStore
    jobs: JobStore
    peers: Peers
    retry_budget_s: float
    run: JobRun
    job: common_pb2.Job
    # CLIP image embedding keys by 'arch|weights_uri', as the extractor stored them.
    image_keys: dict[str, str] = field(default_factory=dict)

    def store_out(self) -> bool:
        """Whether the object store is in an outage (the peers wait for it, and so do jobs)."""
        return self.store.outage_since is not None

    # -- state and progress ----------------------------------------------------------------

    def transition(self, state: State) -> None:
        """Move the job to `state`; Stopped if it was cancelled meanwhile."""
        self.run.check()
        try:
            self.jobs.transition(self.job, state)
        except FailedPrecondition:
            # Cancelled meanwhile: the stored state wins.
            raise Stopped() from None

    def enter(self, state: State) -> None:
        """Move the job to `state` unless it is there or past it already (a resumed job)."""
        if is_before(self.job.state, state):
            self.transition(state)

    def save(self, progress: common_pb2.StageProgress) -> None:
        """Persist a stage's progress and export it as metrics."""
        self.run.check()
        try:
            self.jobs.update_stage(self.job, progress)
        except FailedPrecondition:
            raise Stopped() from None
        job_id = self.job.id
        if progress.total > 0:
            JOB_PROGRESS.labels(job_id, progress.stage).set(progress.done / progress.total)
        JOB_ETA.labels(job_id).set(progress.eta_seconds)
        JOB_LAST_PROGRESS.labels(job_id).set(time.time())

    def n_units(self, layer: str) -> int:
        """Units of a layer, from its stored activations' manifest."""
        try:
            return read_manifest(self.store, self.job.acts_keys[layer], layer).n_units
        except (KeyError, NotFound):
            raise FailedPrecondition(
                f"no stored activations for layer {layer!r}", field="layers"
            ) from None

    def layers_missing(self, method: str) -> list[str]:
        """The job's layers, in order, whose unit blocks of `method` are not all stored."""
        return [
            layer for layer in self.job.spec.layers
            if not covered(self.store, self.job.id, layer, method, self.n_units(layer))
        ]

    # -- RPC plumbing ----------------------------------------------------------------------

    def stream(
        self, peer: Peer, method: str, request: Any, watchdog: ProgressWatchdog | None = None
    ) -> Iterator[Any]:
        """Iterate a server stream of a peer, cancellable through the run.

        Raises StageStalled when the watchdog (the run's, or one of several concurrent
        streams' own) cancelled a silent stream.
        """
        run = self.run
        progress = watchdog or run.progress
        run.check()
        call = getattr(peer.stub, method)(
            request, timeout=STAGE_DEADLINE_S, metadata=peer.metadata
        )
        run.attach(call)
        try:
            with progress.watching(call):
                try:
                    for message in call:
                        progress.arrived()
                        yield message
                except grpc.RpcError:
                    if progress.tripped:
                        raise StageStalled(
                            f"{method} streamed no progress for {progress.limit_s:.0f}s"
                        ) from None
                    raise
        finally:
            run.detach(call)

    def watchdog(self) -> ProgressWatchdog:
        """A watchdog of its own for one of several streams that run at once."""
        return ProgressWatchdog(self.run.no_progress_s, self.run.outage)

    def retrying(
        self, peer: str, attempt: Callable[[], T], watchdog: ProgressWatchdog | None = None
    ) -> T:
        """Run `attempt`, retrying with backoff while the peer is unavailable.

        The retry budget counts from the first of consecutive failures: an attempt
        that streamed progress before it broke starts a fresh budget (one that merely
        lasted long does not), and time while the object store is unreachable does not
        count. A stream the watchdog cancelled for silence is called again at once, at
        most `stage_no_progress_retries` times. `watchdog`: the one `attempt` streams
        under, when not the run's.
        """
        run = self.run
        progress = watchdog or run.progress
        failing_since = 0.0
        delay = RETRY_FIRST_DELAY_S
        stalls = 0
        while True:
            seen = progress.messages
            try:
                return attempt()
            except StageStalled as exc:
                run.check()
                stalls += 1
                if stalls > self.settings.stage_no_progress_retries:
                    raise StageStalled(
                        f"{peer} made no progress for {progress.limit_s:.0f}s in {stalls}"
                        f" attempts in a row ({exc}; each silent call was cancelled and"
                        f" retried): {peer} hangs or cannot reach what it needs"
                    ) from None
                log.warning("job %s: %s: %s; calling it again (retry %d of %d)", run.job_id,
                            peer, exc, stalls, self.settings.stage_no_progress_retries)
                continue
            except grpc.RpcError as exc:
                run.check()
                error = peer_error(exc, peer)
            except Unavailable as exc:
                run.check()
                error = exc
            now = time.monotonic()
            if not failing_since or progress.messages > seen or self.store_out():
                failing_since, delay = now, RETRY_FIRST_DELAY_S
            # A peer that restarts drops its streams as UNAVAILABLE or CANCELLED.
            retryable = isinstance(error, Unavailable | Cancelled)
            if not retryable or now + delay > failing_since + self.retry_budget_s:
                raise error
            log.warning("job %s: %s unavailable (%s); retrying in %.1fs", run.job_id, peer,
                        error, delay)
            if run.stopped.wait(delay):
                raise Stopped()
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def explain_layer(
        self,
        request: explainer_pb2.ExplainRequest,
        on_progress: Callable[[explainer_pb2.ExplainProgress], None],
    ) -> None:
        """Call Explain for one layer until it finishes; check every method's blocks are stored."""

        def attempt() -> None:
            finished = False
            for message in self.stream(self.peers.explainer, "Explain", request):
                on_progress(message)
                finished = finished or message.finished
            if not finished:
                raise Unavailable(f"explainer: stream for layer {request.layer!r} ended early")

        self.retrying("explainer", attempt)
        n_units = self.n_units(request.layer)
        for method in request.methods:
            if not covered(self.store, self.job.id, request.layer, method, n_units):
                raise FailedPrecondition(
                    f"explainer finished layer {request.layer!r} but did not store every unit"
                    f" block of {method!r}"
                )
