"""A servicer built on its service's first call and dropped again when the service is idle.

A servicer's module imports what its jobs need (torch, torchvision, open_clip, Ray,
a method's math); importing it when the process starts would make every idle
service hold those libraries. `lazy_servicer` returns a stand-in, registered in
its place, whose RPC methods build the real servicer on the first call (the
imports happen then) and delegate to it. Concurrent first calls wait for one build.

`release_after_s` seconds after the last call in flight ended, the stand-in drops
the real servicer and whatever it holds (loaded models, cached text encoders) and
gives the freed memory back to the operating system (`release_memory`). The
libraries stay imported: Python cannot unload them, so a service that ran a job
keeps their code and import-time data; the next call rebuilds the servicer, which
is cheap then.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.protobuf.descriptor import ServiceDescriptor

log = logging.getLogger(__name__)

# Idle seconds after which a service drops its servicer (a job's stages call a
# service several times within seconds; minutes apart means the job is over).
RELEASE_AFTER_S = 30.0

S = TypeVar("S")


def release_memory() -> None:
    """Collect garbage, empty torch's CUDA cache, and trim glibc's heap.

    glibc keeps freed small and medium blocks (a model's many parameter tensors)
    in its arenas; `malloc_trim(0)` returns their free pages to the system.
    """
    gc.collect()
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


class _Holder:
    """The real servicer while calls need it; counts calls in flight, releases when idle."""

    def __init__(self, name: str, build: Callable[[], Any], release_after_s: float) -> None:
        self.name = name
        self.build = build
        self.release_after_s = release_after_s
        self.real: Any = None
        self.calls = 0
        # Bumped by every call: a release timer set before a later call is stale.
        self.generation = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[Any]:
        """The real servicer (built if needed) for the duration of one call."""
        with self.lock:
            self.calls += 1
            self.generation += 1
            try:
                if self.real is None:
                    log.info("%s: loading its servicer", self.name)
                    self.real = self.build()
                real = self.real
            except BaseException:
                self.calls -= 1
                raise
        try:
            yield real
        finally:
            with self.lock:
                self.calls -= 1
                if self.calls == 0:
                    timer = threading.Timer(self.release_after_s, self.release,
                                            args=(self.generation,))
                    timer.daemon = True
                    timer.start()

    def release(self, generation: int) -> None:
        """Drop the servicer if no call came since the timer for `generation` was set."""
        with self.lock:
            if self.calls or generation != self.generation or self.real is None:
                return
            self.real = None
        release_memory()
        log.info("%s: idle for %.0f s; servicer and its models released",
                 self.name, self.release_after_s)


def _delegate(holder: _Holder, method: str, streaming: bool) -> Callable[..., Any]:
    if streaming:
        def stream(self: Any, request: Any, context: Any) -> Iterator[Any]:
            with holder.in_flight() as real:
                yield from getattr(real, method)(request, context)

        return stream

    def unary(self: Any, request: Any, context: Any) -> Any:
        with holder.in_flight() as real:
            return getattr(real, method)(request, context)

    return unary


def lazy_servicer(
    base: type[S],
    service: ServiceDescriptor,
    build: Callable[[], S],
    release_after_s: float = RELEASE_AFTER_S,
) -> S:
    """An instance of `base` (a generated `*Servicer` class) whose RPCs run on `build()`'s.

    `service` names the RPC methods and says which stream their responses.
    """
    holder = _Holder(service.name, build, release_after_s)
    methods = {
        m.name: _delegate(holder, m.name, m.server_streaming) for m in service.methods
    }
    stand_in: type[S] = type(f"Lazy{base.__name__}", (base,), methods)
    return stand_in()
