"""The no-progress watchdog of the job runner: it cancels a silent call, never a busy one."""

from __future__ import annotations

import threading
import time

from services.gateway.progress_watchdog import ProgressWatchdog


class Call:
    """A stand-in for an in-flight gRPC call: records its cancellation."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_a_silent_call_is_cancelled_after_the_limit() -> None:
    watchdog, call = ProgressWatchdog(0.4), Call()
    started = time.monotonic()
    with watchdog.watching(call):
        assert call.cancelled.wait(5)
    assert watchdog.tripped and time.monotonic() - started >= 0.4


def test_a_call_that_keeps_streaming_is_left_alone() -> None:
    watchdog, call = ProgressWatchdog(0.4), Call()
    with watchdog.watching(call):
        for _ in range(12):
            time.sleep(0.1)
            watchdog.touch()
    assert not call.cancelled.is_set() and not watchdog.tripped


def test_silence_while_paused_does_not_count_and_resume_restarts_the_clock() -> None:
    watchdog, call = ProgressWatchdog(0.4), Call()
    with watchdog.watching(call):
        with watchdog.paused():
            time.sleep(1.0)
        time.sleep(0.2)
        assert not call.cancelled.is_set()
        assert call.cancelled.wait(5)
    assert watchdog.tripped


def test_each_watch_starts_untripped() -> None:
    watchdog = ProgressWatchdog(0.2)
    with watchdog.watching(Call()):
        time.sleep(0.8)
    assert watchdog.tripped
    with watchdog.watching(Call()):
        watchdog.touch()
    assert not watchdog.tripped


def test_silence_during_a_store_outage_does_not_count() -> None:
    outage = threading.Event()
    outage.set()
    watchdog, call = ProgressWatchdog(0.4, outage.is_set), Call()
    with watchdog.watching(call):
        time.sleep(1.0)
        assert not call.cancelled.is_set()
        outage.clear()  # the store is back: the clock starts afresh
        time.sleep(0.2)
        assert not call.cancelled.is_set()
        assert call.cancelled.wait(5)
    assert watchdog.tripped


def test_arrived_counts_progress_messages() -> None:
    watchdog = ProgressWatchdog(10.0)
    watchdog.arrived()
    watchdog.arrived()
    watchdog.touch()
    assert watchdog.messages == 2
