"""Ray sharding of a layer's units: unit blocks, Ray start-up, retries, cancellation.

A layer's units [unit_start, unit_end) are cut into blocks on the fixed grid of
multiples of `unit_block_size` ([0, 64), [64, 128) …, clipped to the range), so a
block's result key does not depend on where a request starts and a resumed or
narrowed request finds the blocks an earlier one stored. One Ray task runs per
block; `gather` yields their outcomes as they finish, counts retries and failures
in the metrics, and cancels what is outstanding when the caller goes away.

Ray local vs cluster is the `ray_address` setting (`RAY_ADDRESS`): empty starts a
local Ray in this process (`ray_num_cpus` CPUs when > 0; workers started for tasks
only, `ray_workers.LAZY_WORKER_CONFIG`), anything else connects to
that cluster; both go through the same `ray.init` call. A cluster with token
authentication (Ray's default for `ray start`) needs `RAY_AUTH_MODE=token` and its
token (`RAY_AUTH_TOKEN`, or the token file `RAY_AUTH_TOKEN_PATH`) in the explainer's
environment: Ray never turns token auth on by itself for an explicit address. A
local Ray is started without the API token or store secrets in its environment
(its workers inherit it); tasks get the store credentials as arguments.

The explainer imports this module (and Ray) with its first job, and connects
then; `ray_watch` follows the cluster without importing Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError

from services.common.errors import Cancelled, NeurodissectError, StoreError, Unavailable
from services.common.metrics import RAY_TASK_FAILURES, RAY_TASK_RETRIES
from services.common.ray_workers import LAZY_WORKER_CONFIG
from services.common.settings import Settings

log = logging.getLogger(__name__)

# Attempts after the first for a block task whose worker died or that raised a transient error.
MAX_RETRIES = 3
# Errors worth another attempt: the object store or the network hiccuped.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    StoreError,
    Unavailable,
    ConnectionError,
    TimeoutError,
)
# How long `connect` keeps trying a Ray cluster, and its first wait between attempts.
CONNECT_TIMEOUT_S = 60.0
CONNECT_FIRST_DELAY_S = 1.0
# How often `gather` wakes up to check whether the caller is still there.
POLL_S = 0.25
# Environment variables a local Ray (and so its workers) never inherits.
SECRET_ENV_PREFIXES = ("NEURODISSECT_AUTH_TOKEN", "NEURODISSECT_S3_", "AWS_")

_init_lock = threading.Lock()


def unit_blocks(unit_start: int, unit_end: int, block_size: int) -> list[tuple[int, int]]:
    """Cut [unit_start, unit_end) into blocks on the grid of multiples of `block_size`.

    >>> unit_blocks(10, 140, 64)
    [(10, 64), (64, 128), (128, 140)]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    blocks = []
    u0 = unit_start
    while u0 < unit_end:
        u1 = min((u0 // block_size + 1) * block_size, unit_end)
        blocks.append((u0, u1))
        u0 = u1
    return blocks


def connect(settings: Settings) -> None:
    """Start a local Ray or connect to the cluster at `settings.ray_address`, once per process.

    Both are retried with backoff for `CONNECT_TIMEOUT_S`: in a deployment the explainer
    may start before the Ray head is up, a Ray client's first connection can fail while
    the head starts its per-client server, and a local Ray's start can time out on busy
    cores.
    """
    with _init_lock:
        if ray.is_initialized():
            return
        address = settings.ray_address or "local"
        local = address == "local"
        # A local start is retried too: on busy cores its GCS can miss Ray's own start-up
        # wait, and since the idle stack that start happens inside the first Explain call.
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        delay = CONNECT_FIRST_DELAY_S
        while True:
            try:
                with _without_secrets() if local else contextlib.nullcontext():
                    ray.init(
                        address=address,
                        num_cpus=settings.ray_num_cpus
                        if local and settings.ray_num_cpus > 0 else None,
                        include_dashboard=False if local else None,
                        logging_level=logging.WARNING,
                        _system_config=LAZY_WORKER_CONFIG if local else None,
                    )
                break
            except (ConnectionError, RuntimeError) as exc:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"cannot reach the Ray cluster at {address!r}: {exc} (a cluster with"
                        " token authentication needs RAY_AUTH_MODE=token and its token)",
                        field="RAY_ADDRESS",
                    ) from exc
                log.warning("Ray at %s not reachable (%s); retrying in %.0f s", address, exc, delay)
                ray.shutdown()
                time.sleep(delay)
                delay *= 2
        log.info("Ray %s: %s", "started locally" if local else "connected", address)


@contextlib.contextmanager
def _without_secrets() -> Iterator[None]:
    """Hide the API token and store secrets from the processes a local `ray.init` starts."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(SECRET_ENV_PREFIXES)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def task_settings(settings: Settings) -> Settings:
    """The settings handed to Ray tasks: the store's credentials, never the API token."""
    return settings.replace(auth_token="")


def block_task(function: Callable[..., BlockOutcome]) -> Any:
    """Make `function` a Ray task that Ray retries when its worker dies or on transient errors."""
    options: dict[str, Any] = {
        "max_retries": MAX_RETRIES,
        "retry_exceptions": list(TRANSIENT_ERRORS),
    }
    return ray.remote(**options)(function)


def attempt_number() -> int:
    """Inside a Ray task: 0 on the first attempt, k on the k-th retry.

    Ray retries a task whose worker died without telling the caller; the task
    reports its attempt so the driver can count retries.
    """
    # Ray exposes the attempt only through the core worker, not the public runtime context.
    worker: Any = ray._private.worker.global_worker
    return int(worker.core_worker.get_current_task_attempt_number())


@dataclass(frozen=True)
class BlockOutcome:
    """What a block task reports back.

    `computed` is False when the block's result was already stored and the task
    only found it there. `value` carries a task's in-memory answer (CLIP-Dissect's
    rows of the block), None for tasks that write their results to the store.
    """

    u0: int
    u1: int
    attempt: int
    computed: bool
    value: Any = None

    @property
    def units(self) -> int:
        """Number of units in the block."""
        return self.u1 - self.u0


def _cause(exc: RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _count_failure(exc: BaseException) -> None:
    RAY_TASK_FAILURES.inc()
    retried = isinstance(exc, TRANSIENT_ERRORS) or (
        isinstance(exc, RayError) and not isinstance(exc, RayTaskError | TaskCancelledError)
    )
    if retried:
        RAY_TASK_RETRIES.inc(MAX_RETRIES)


def cancel(refs: Sequence[ray.ObjectRef]) -> None:
    """Cancel Ray tasks that may still be queued or running (finished ones are unaffected).

    Running tasks are killed with their worker process (`force`): an interrupt would
    wait for a long numpy or torch call to return first. Result writes are atomic,
    so a killed task leaves no partial block behind.
    """
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except (RayError, ValueError, TypeError) as exc:
            log.debug("cancel %s: %s", ref, exc)


def gather(
    refs: Sequence[ray.ObjectRef], is_active: Callable[[], bool], poll_s: float = POLL_S
) -> Iterator[BlockOutcome]:
    """Yield the `BlockOutcome` of each task as it finishes, in completion order.

    Every `poll_s` seconds `is_active()` is asked whether the caller still wants the
    answers; when it says no, outstanding tasks are cancelled and `Cancelled` is
    raised. A task that fails for good cancels the others and raises its own error
    (a project error keeps its type, so its gRPC status reaches the client).
    """
    pending = list(refs)
    try:
        while pending:
            if not is_active():
                raise Cancelled("the client cancelled the Explain call")
            done, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
            for ref in done:
                try:
                    outcome: BlockOutcome = ray.get(ref, timeout=60)
                except GetTimeoutError as exc:
                    raise Unavailable(f"a finished task's result is unreachable: {exc}") from exc
                except RayTaskError as exc:
                    cause = _cause(exc)
                    _count_failure(cause)
                    if isinstance(cause, NeurodissectError):
                        raise cause from None
                    raise
                except RayError as exc:
                    _count_failure(exc)
                    raise Unavailable(f"a Ray block task failed: {exc}") from exc
                RAY_TASK_RETRIES.inc(outcome.attempt)
                yield outcome
    finally:
        if pending:
            cancel(pending)
