"""Stop requests between runs: a worker that trains run after run (a local launch's, a tuning worker) records
SIGTERM from its launcher from its first line on, stops before its next run, and a run that is starting stops at its
first step (`sweep.train.signals.StopSignals`). Kept apart from the trainer so that importing it costs nothing:
the request must be caught before torch is imported."""
from __future__ import annotations

import signal
from contextlib import contextmanager

_received: list[int] | None = None  # while `stop_requests` is active


@contextmanager
def stop_requests(*signums: int):
    """Record `signums` in the list it yields (and for `stop_requested`) instead of their handlers running."""
    global _received
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    _received = received
    try:
        yield received
    finally:
        _received = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested() -> list[int]:
    """The signals an active `stop_requests` has received (empty when none is active)."""
    return list(_received or [])
