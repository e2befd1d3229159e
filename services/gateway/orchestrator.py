"""Runs jobs through their stages, at most `max_concurrent_jobs` at a time.

Stages, each driven by one peer RPC per layer (one Extract for all layers):

1. EXTRACTING: Extract streams image progress; its last message names the stored
   dataset, activations and CLIP image embeddings.
2. EXPLAINING: per layer, Explain with the requested methods among netdissect,
   compositional, clip_dissect and linear, over all units (the explainer splits
   them into Ray tasks of `compute.unit_block_size` units and stores one result
   object per block). CLIP-Dissect and LE(CLIP) get their text embeddings from the
   extractor's EmbedText first.
3. CAPTIONING: per layer, Caption (when the spec sets `milan`).
4. REPORTING: when the spec sets `simulation`, every label and caption the methods
   produced is embedded with the simulator CLIP (when one is configured) and
   Explain runs `simulation` per layer; then per-layer summaries are computed, the
   units' exemplar thumbnails are materialized by the extractor, and the web UI's
   pages are written as a static copy under `reports/{job}/` (`index.html` first).

A stage whose outputs are already stored (every unit block of a layer and method)
is not called again, and the peers themselves skip cached work, so a job resumed
after a gateway crash redoes nothing that completed. A peer that is UNAVAILABLE is
retried with backoff for `retry_budget_s`; any other failure marks the job FAILED
with the error. A stage stream that brings no progress for `stage_no_progress_s` is
cancelled by the run's `ProgressWatchdog` and called again, up to
`stage_no_progress_retries` times; then the job fails naming the silent peer.
CancelJob marks the job CANCELLED and cancels the in-flight RPC.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
from neurodissect.v1 import (
    captioner_pb2,
    common_pb2,
    explainer_pb2,
    extractor_pb2,
)

from services.common import keys
from services.common.activations import read_manifest
from services.common.client import Peer
from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    NeurodissectError,
    NotFound,
    Unavailable,
)
from services.common.metrics import JOB_ETA, JOB_LAST_PROGRESS, JOB_PROGRESS, QUEUE_LENGTH
from services.common.result_store import covered, layer_summary
from services.common.settings import Settings
from services.common.spec_vocabulary import EXPLAIN_METHODS
from services.common.store import ObjectStore
from services.gateway import results
from services.gateway.jobs import TERMINAL, JobStore, State, is_before
from services.gateway.peers import Peers, peer_error
from services.gateway.validation import requested_methods
from services.gateway.webui import export, figures
from services.gateway.webui.data import JobReader
from services.gateway.webui.pages import PageBuilder
from services.gateway.webui.render import Renders

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deadline of one stage RPC (a whole layer's explanation can take hours at scale).
STAGE_DEADLINE_S = 24 * 3600.0
# Backoff of calls to an unavailable peer; an attempt that streamed progress before it
# failed starts the backoff and the retry budget afresh.
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 15.0
# Thumbnails asked of the extractor in one Materialize call.
MATERIALIZE_BATCH = 512


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class _Stopped(Exception):
    """The run was cancelled or the gateway is shutting down: leave the job as stored."""


class StageStalled(Unavailable):
    """A stage's peer streamed no progress for `stage_no_progress_s`."""


class ProgressWatchdog:
    """Cancels a job's in-flight stage call that streams no progress for `limit_s` seconds.

    The job runner arms it around each peer stream (`watching`) and touches it on
    every message (`messages` counts them). While it is paused (`pause`/`resume`, or
    `with paused():`) or `outage()` says the object store is unreachable (the peers
    then wait for it too), silence does not count, and the clock restarts afterwards.
    """

    def __init__(self, limit_s: float, outage: Callable[[], bool] = lambda: False) -> None:
        self.limit_s = limit_s
        self.outage = outage
        self.tripped = False
        self.messages = 0
        self._poll_s = min(1.0, limit_s / 4)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._pauses = 0

    def touch(self) -> None:
        """Restart the clock."""
        with self._lock:
            self._last = time.monotonic()

    def arrived(self) -> None:
        """A progress message arrived: count it and restart the clock."""
        with self._lock:
            self.messages += 1
            self._last = time.monotonic()

    def pause(self) -> None:
        """Stop counting silence until the matching `resume`."""
        with self._lock:
            self._pauses += 1

    def resume(self) -> None:
        """Count silence again, from now."""
        with self._lock:
            self._pauses = max(0, self._pauses - 1)
            self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Silence inside the block does not count."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def _silent(self) -> bool:
        with self._lock:
            if self._pauses or self.outage():
                self._last = time.monotonic()
                return False
            return time.monotonic() - self._last > self.limit_s

    @contextlib.contextmanager
    def watching(self, call: _Cancellable) -> Iterator[None]:
        """Cancel `call` if it goes silent before the block ends; `tripped` says it did."""
        done = threading.Event()
        self.tripped = False
        self.touch()

        def watch() -> None:
            while not done.wait(self._poll_s):
                if self._silent():
                    self.tripped = True
                    call.cancel()
                    return

        thread = threading.Thread(target=watch, name="progress-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


class _Run:
    """One job being run: its stop flag, the RPC it is waiting on and its progress watchdog."""

    def __init__(
        self, job_id: str, no_progress_s: float, outage: Callable[[], bool] = lambda: False
    ) -> None:
        self.job_id = job_id
        self.stopped = threading.Event()
        self.progress = ProgressWatchdog(no_progress_s, outage)
        self._lock = threading.Lock()
        self._call: _Cancellable | None = None

    def attach(self, call: _Cancellable | None) -> None:
        """Record the in-flight call (None when it is done); cancel it at once if stopped."""
        with self._lock:
            self._call = call
            if call is not None and self.stopped.is_set():
                call.cancel()

    def stop(self) -> None:
        """Ask the run to stop and cancel its in-flight call."""
        with self._lock:
            self.stopped.set()
            if self._call is not None:
                self._call.cancel()

    def check(self) -> None:
        """Raise _Stopped if the run was asked to stop."""
        if self.stopped.is_set():
            raise _Stopped()


class _StageClock:
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


def clip_id(clip: common_pb2.ClipModelSpec) -> str:
    """The extractor's name for a CLIP model in `image_embedding_keys`: 'arch|weights_uri'."""
    return f"{clip.arch}|{clip.weights_uri}"


def linear_clip(spec: common_pb2.DissectionSpec) -> common_pb2.ClipModelSpec:
    """The CLIP model of LE(CLIP): `linear.clip`, else CLIP-Dissect's."""
    return spec.linear.clip if spec.linear.HasField("clip") else spec.clip_dissect.clip


def clip_models(spec: common_pb2.DissectionSpec) -> list[common_pb2.ClipModelSpec]:
    """Every CLIP model whose image embeddings the spec's methods need, without repeats."""
    models: list[common_pb2.ClipModelSpec] = []
    if spec.HasField("clip_dissect"):
        models.append(spec.clip_dissect.clip)
    if spec.HasField("linear") and spec.linear.concepts == "clip":
        models.append(linear_clip(spec))
    if spec.HasField("simulation") and spec.simulation.simulator.arch:
        models.append(spec.simulation.simulator)
    unique = {clip_id(m): m for m in models}
    return list(unique.values())


class Orchestrator:
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
        self._running: dict[str, _Run] = {}
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

    def _store_out(self) -> bool:
        """Whether the object store is in an outage (the peers wait for it, and so do jobs)."""
        return self.store.outage_since is not None

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

    def _pump(self) -> None:
        # Called with the lock held.
        while (
            not self._closed
            and self._queue
            and len(self._running) < max(1, self.settings.max_concurrent_jobs)
        ):
            run = _Run(self._queue.popleft(), self.settings.stage_no_progress_s, self._store_out)
            self._running[run.job_id] = run
            thread = threading.Thread(
                target=self._run, args=(run,), name=f"job-{run.job_id}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        QUEUE_LENGTH.set(len(self._queue))

    def _run(self, run: _Run) -> None:
        try:
            self._execute(run)
        finally:
            with self._lock:
                self._running.pop(run.job_id, None)
                self._pump()

    # -- one job ---------------------------------------------------------------------------

    def _execute(self, run: _Run) -> None:
        job = self.jobs.get(run.job_id)
        if job.state in TERMINAL:
            return
        stage = "extract"
        try:
            image_keys = self._extract(run, job)
            stage = "explain"
            self._explain(run, job, image_keys)
            if job.spec.HasField("milan"):
                stage = "caption"
                self._caption(run, job)
            stage = "report"
            self._report(run, job, image_keys)
            self._transition(run, job, common_pb2.SUCCEEDED)
            log.info("job %s succeeded", job.id)
        except _Stopped:
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

    def _transition(self, run: _Run, job: common_pb2.Job, state: State) -> None:
        run.check()
        try:
            self.jobs.transition(job, state)
        except FailedPrecondition:
            # Cancelled meanwhile: the stored state wins.
            raise _Stopped() from None

    def _enter(self, run: _Run, job: common_pb2.Job, state: State) -> None:
        if is_before(job.state, state):
            self._transition(run, job, state)

    def _save(self, run: _Run, job: common_pb2.Job, progress: common_pb2.StageProgress) -> None:
        run.check()
        try:
            self.jobs.update_stage(job, progress)
        except FailedPrecondition:
            raise _Stopped() from None
        if progress.total > 0:
            JOB_PROGRESS.labels(job.id, progress.stage).set(progress.done / progress.total)
        JOB_ETA.labels(job.id).set(progress.eta_seconds)
        JOB_LAST_PROGRESS.labels(job.id).set(time.time())

    def _clear_metrics(self, job: common_pb2.Job) -> None:
        for stage in ("extract", "explain", "caption", "report"):
            with contextlib.suppress(KeyError):
                JOB_PROGRESS.remove(job.id, stage)
        for gauge in (JOB_ETA, JOB_LAST_PROGRESS):
            with contextlib.suppress(KeyError):
                gauge.remove(job.id)

    # -- RPC plumbing ----------------------------------------------------------------------

    def _stream(self, run: _Run, peer: Peer, method: str, request: Any) -> Iterator[Any]:
        """Iterate a server stream of a peer, cancellable through `run`.

        Raises StageStalled when the run's watchdog cancelled a silent stream.
        """
        run.check()
        call = getattr(peer.stub, method)(
            request, timeout=STAGE_DEADLINE_S, metadata=peer.metadata
        )
        run.attach(call)
        try:
            with run.progress.watching(call):
                try:
                    for message in call:
                        run.progress.arrived()
                        yield message
                except grpc.RpcError:
                    if run.progress.tripped:
                        raise StageStalled(
                            f"{method} streamed no progress for {run.progress.limit_s:.0f}s"
                        ) from None
                    raise
        finally:
            run.attach(None)

    def _retrying(self, run: _Run, peer: str, attempt: Callable[[], T]) -> T:
        """Run `attempt`, retrying with backoff while the peer is unavailable.

        The retry budget counts from the first of consecutive failures: an attempt
        that streamed progress before it broke starts a fresh budget (one that merely
        lasted long does not), and time while the object store is unreachable does not
        count. A stream the watchdog cancelled for silence is called again at once, at
        most `stage_no_progress_retries` times.
        """
        failing_since = 0.0
        delay = RETRY_FIRST_DELAY_S
        stalls = 0
        while True:
            seen = run.progress.messages
            try:
                return attempt()
            except StageStalled as exc:
                run.check()
                stalls += 1
                if stalls > self.settings.stage_no_progress_retries:
                    raise StageStalled(
                        f"{peer} made no progress for {run.progress.limit_s:.0f}s in {stalls}"
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
            if not failing_since or run.progress.messages > seen or self._store_out():
                failing_since, delay = now, RETRY_FIRST_DELAY_S
            # A peer that restarts drops its streams as UNAVAILABLE or CANCELLED.
            retryable = isinstance(error, Unavailable | Cancelled)
            if not retryable or now + delay > failing_since + self.retry_budget_s:
                raise error
            log.warning("job %s: %s unavailable (%s); retrying in %.1fs", run.job_id, peer,
                        error, delay)
            if run.stopped.wait(delay):
                raise _Stopped()
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def _n_units(self, job: common_pb2.Job, layer: str) -> int:
        try:
            return read_manifest(self.store, job.acts_keys[layer], layer).n_units
        except (KeyError, NotFound):
            raise FailedPrecondition(
                f"no stored activations for layer {layer!r}", field="layers"
            ) from None

    def _explain_layer(
        self,
        run: _Run,
        job: common_pb2.Job,
        request: explainer_pb2.ExplainRequest,
        on_progress: Callable[[explainer_pb2.ExplainProgress], None],
    ) -> None:
        def attempt() -> None:
            finished = False
            for message in self._stream(run, self.peers.explainer, "Explain", request):
                on_progress(message)
                finished = finished or message.finished
            if not finished:
                raise Unavailable(f"explainer: stream for layer {request.layer!r} ended early")

        self._retrying(run, "explainer", attempt)
        n_units = self._n_units(job, request.layer)
        for method in request.methods:
            if not covered(self.store, job.id, request.layer, method, n_units):
                raise FailedPrecondition(
                    f"explainer finished layer {request.layer!r} but did not store every unit"
                    f" block of {method!r}"
                )

    # -- stages ----------------------------------------------------------------------------

    def _extract(self, run: _Run, job: common_pb2.Job) -> dict[str, str]:
        """Run Extract (cached by the extractor when already done); return CLIP image keys."""
        self._enter(run, job, common_pb2.EXTRACTING)
        spec = job.spec
        request = extractor_pb2.ExtractRequest(
            job_id=job.id,
            model=spec.model,
            layers=spec.layers,
            dataset=spec.dataset,
            compute=spec.compute,
            clip_models=clip_models(spec),
        )
        clock = _StageClock("extract", "images")

        def attempt() -> extractor_pb2.ExtractProgress:
            for message in self._stream(run, self.peers.extractor, "Extract", request):
                if message.finished:
                    return message
                self._save(run, job, clock.progress(
                    message.images_done, message.images_total, message.message))
            raise Unavailable("extractor: stream ended without a finished message")

        final = self._retrying(run, "extractor", attempt)
        job.dataset_key = final.dataset_key
        job.acts_keys.clear()
        job.acts_keys.update(final.acts_keys)
        job.bad_images = final.bad_images
        del job.bad_image_examples[:]
        job.bad_image_examples.extend(final.bad_image_examples)
        missing = [layer for layer in spec.layers if layer not in job.acts_keys]
        if missing:
            raise FailedPrecondition(f"extractor returned no activations for {missing}")
        self._save(run, job, clock.progress(
            final.images_total, final.images_total,
            "cached" if final.cached else final.message or "done"))
        return dict(final.image_embedding_keys)

    def _image_key(self, image_keys: dict[str, str], clip: common_pb2.ClipModelSpec) -> str:
        try:
            return image_keys[clip_id(clip)]
        except KeyError:
            raise FailedPrecondition(
                f"extractor stored no image embeddings for CLIP {clip_id(clip)!r}"
            ) from None

    def _embed(self, run: _Run, request: extractor_pb2.EmbedTextRequest) -> str:
        return self._retrying(run, "extractor", lambda: self.peers.embed_text(request))

    def _method_embeddings(
        self, run: _Run, job: common_pb2.Job, image_keys: dict[str, str]
    ) -> dict[str, explainer_pb2.ConceptEmbeddings]:
        """ConceptEmbeddings for CLIP-Dissect and LE(CLIP), as ExplainRequest fields."""
        spec = job.spec
        out: dict[str, explainer_pb2.ConceptEmbeddings] = {}
        concept_set = spec.clip_dissect.concept_set_uri if spec.HasField("clip_dissect") else ""
        wanted = []
        if spec.HasField("clip_dissect"):
            wanted.append(("clip_dissect", spec.clip_dissect.clip))
        if spec.HasField("linear") and spec.linear.concepts == "clip":
            wanted.append(("linear", linear_clip(spec)))
        for method, clip in wanted:
            text_key = self._embed(run, extractor_pb2.EmbedTextRequest(
                clip=clip, concept_set_uri=concept_set, dataset_key=job.dataset_key))
            out[method] = explainer_pb2.ConceptEmbeddings(
                image_key=self._image_key(image_keys, clip), text_key=text_key
            )
        return out

    def _explain(self, run: _Run, job: common_pb2.Job, image_keys: dict[str, str]) -> None:
        spec = job.spec
        methods = [m for m in requested_methods(spec) if m in EXPLAIN_METHODS]
        if not methods:
            return
        self._enter(run, job, common_pb2.EXPLAINING)
        n_units = {layer: self._n_units(job, layer) for layer in spec.layers}
        total = sum(n_units.values()) * len(methods)
        done: dict[tuple[str, str], int] = {}
        todo: dict[str, list[str]] = {}
        for layer in spec.layers:
            for method in methods:
                if covered(self.store, job.id, layer, method, n_units[layer]):
                    done[(layer, method)] = n_units[layer]
                else:
                    todo.setdefault(layer, []).append(method)
        clock = _StageClock("explain", "units")
        self._save(run, job, clock.progress(sum(done.values()), total, "starting"))
        if not todo:
            return
        if spec.HasField("clip_dissect") or spec.linear.concepts == "clip":
            self._save(run, job, clock.progress(
                sum(done.values()), total, "embedding the concepts with CLIP (extractor)"))
        embeddings = self._method_embeddings(run, job, image_keys)
        for layer, layer_methods in todo.items():
            request = explainer_pb2.ExplainRequest(
                job_id=job.id,
                layer=layer,
                methods=layer_methods,
                spec=spec,
                dataset_key=job.dataset_key,
                acts_key=job.acts_keys[layer],
                **{m: embeddings[m] for m in layer_methods if m in embeddings},
            )

            def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
                if message.method:
                    done[(layer, message.method)] = min(message.units_done, n_units[layer])
                text = f"{layer}: {message.method} {message.message}".strip()
                self._save(run, job, clock.progress(sum(done.values()), total, text))

            self._explain_layer(run, job, request, on_progress)
            for method in layer_methods:
                done[(layer, method)] = n_units[layer]
            self._save(run, job, clock.progress(sum(done.values()), total, f"{layer}: done"))

    def _caption(self, run: _Run, job: common_pb2.Job) -> None:
        spec = job.spec
        self._enter(run, job, common_pb2.CAPTIONING)
        n_units = {layer: self._n_units(job, layer) for layer in spec.layers}
        total = sum(n_units.values())
        done = {
            layer: n
            for layer, n in n_units.items()
            if covered(self.store, job.id, layer, "milan", n)
        }
        clock = _StageClock("caption", "units")
        self._save(run, job, clock.progress(sum(done.values()), total, "starting"))
        for layer in spec.layers:
            if layer in done:
                continue
            request = captioner_pb2.CaptionRequest(
                job_id=job.id,
                layer=layer,
                params=spec.milan,
                dataset=spec.dataset,
                dataset_key=job.dataset_key,
                acts_key=job.acts_keys[layer],
                compute=spec.compute,
            )

            def attempt(
                request: captioner_pb2.CaptionRequest = request, layer: str = layer
            ) -> None:
                finished = False
                for message in self._stream(run, self.peers.captioner, "Caption", request):
                    done[layer] = min(message.units_done, n_units[layer])
                    self._save(run, job, clock.progress(
                        sum(done.values()), total, f"{layer}: {message.message}".strip()))
                    finished = finished or message.finished
                if not finished:
                    raise Unavailable(f"captioner: stream for layer {layer!r} ended early")

            self._retrying(run, "captioner", attempt)
            if not covered(self.store, job.id, layer, "milan", n_units[layer]):
                raise FailedPrecondition(
                    f"captioner finished layer {layer!r} but did not store every unit block"
                )
            done[layer] = n_units[layer]

    def _simulate(
        self, run: _Run, job: common_pb2.Job, image_keys: dict[str, str], clock: _StageClock
    ) -> None:
        """Score every explanation by simulation, per layer (skipping scored layers)."""
        spec = job.spec
        n_units = {layer: self._n_units(job, layer) for layer in spec.layers}
        todo = [
            layer
            for layer in spec.layers
            if not covered(self.store, job.id, layer, "simulation", n_units[layer])
        ]
        total = sum(n_units.values())
        done = {layer: n for layer, n in n_units.items() if layer not in todo}
        self._save(run, job, clock.progress(sum(done.values()), total, "simulation"))
        if not todo:
            return
        simulator = spec.simulation.simulator
        embeddings = explainer_pb2.ConceptEmbeddings()
        if simulator.arch:
            texts = sorted({
                text
                for layer in spec.layers
                for unit in results.unit_results(self.store, job.id, layer)
                for text in results.unit_labels(unit)
            })
            if texts:
                message = f"embedding {len(texts)} labels and captions with the simulator's CLIP"
                self._save(run, job, clock.progress(sum(done.values()), total, message))
                embeddings.image_key = self._image_key(image_keys, simulator)
                embeddings.text_key = self._embed(
                    run, extractor_pb2.EmbedTextRequest(clip=simulator, texts=texts))
        for layer in todo:
            request = explainer_pb2.ExplainRequest(
                job_id=job.id,
                layer=layer,
                methods=["simulation"],
                spec=spec,
                dataset_key=job.dataset_key,
                acts_key=job.acts_keys[layer],
                simulation=embeddings,
            )

            def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
                done[layer] = min(message.units_done, n_units[layer])
                self._save(run, job, clock.progress(
                    sum(done.values()), total, f"{layer}: simulation {message.message}".strip()))

            self._explain_layer(run, job, request, on_progress)
            done[layer] = n_units[layer]

    def _thumbnails(
        self, run: _Run, job: common_pb2.Job, layers: dict[str, list[common_pb2.UnitResult]]
    ) -> None:
        """Have the extractor store the thumbnails of every unit's exemplars shown in the pages.

        The pages are still written without the images it cannot provide; that is
        logged, not a job failure.
        """
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
                self._retrying(run, "extractor", functools.partial(self.peers.materialize, request))
        except NeurodissectError as exc:
            log.warning("job %s: pages without some exemplar images: %s", job.id, exc)

    def _report(self, run: _Run, job: common_pb2.Job, image_keys: dict[str, str]) -> None:
        self._enter(run, job, common_pb2.REPORTING)
        spec = job.spec
        clock = _StageClock("report", "units")
        if spec.HasField("simulation"):
            self._simulate(run, job, image_keys, clock)
        layers = {
            layer: results.unit_results(self.store, job.id, layer) for layer in spec.layers
        }
        del job.summary[:]
        job.summary.extend(
            layer_summary(self.store, job.id, layer, self._n_units(job, layer))
            for layer in layers
        )
        self._thumbnails(run, job, layers)
        run.check()
        # The copy describes the job as it ends: this stage is its last step.
        finished = common_pb2.Job()
        finished.CopyFrom(job)
        finished.state = common_pb2.SUCCEEDED
        builder = PageBuilder(
            JobReader(self.store, jobs=self.jobs), Renders(self.store), live=False
        )
        export.write_copy(builder, finished, export.store_put(self.store, job.id))
        job.report_key = keys.report(job.id, "index.html")
        total = sum(s.units for s in job.summary)
        self._save(run, job, clock.progress(total, total, "report written"))
