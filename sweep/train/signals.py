"""Staying stoppable and visible: SIGTERM/SIGUSR2 become a checkpoint and a clean stop; a heartbeat file says the
run is alive."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from sweep.stopping import stop_requested


class Interrupted(RuntimeError):
    """A SIGTERM/SIGUSR2 arrived; a checkpoint was written and a rerun resumes from it."""

    def __init__(self, signum: int, step: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written, "
                         f"rerun on the same directory to resume")


class StopSignals:
    """Turn SIGTERM/SIGUSR2 (a kill, a Slurm preemption or time-out) into a request the loop honours between
    steps: it writes a checkpoint, then hands the signal to whoever handled it before (submitit requeues the
    job there), else stops with `Interrupted`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, enabled: bool):
        self.enabled, self.received, self.previous, self.honoured = enabled, [], {}, False

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            self.previous = {s: signal.signal(s, lambda signum, frame: self.received.append(signum))
                             for s in self.SIGNALS}
            self.received += stop_requested()  # asked for while the run was starting: it stops at its first step
        return self

    def __exit__(self, *exc) -> None:
        previous, self.previous = self.previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        # a signal that came too late to stop the run (during its last evaluation) goes to whoever handled it
        # before, such as a local worker that then starts no other run (`stop_requests`)
        if self.received and not self.honoured and callable(previous.get(self.received[0])):
            previous[self.received[0]](self.received[0], None)

    @property
    def signum(self) -> int:
        """The first signal received, 0 if none."""
        return self.received[0] if self.received else 0

    def honour(self, step: int, signum: int) -> None:
        """Called after the checkpoint is written, with the signal to act on (on several ranks: one that any rank
        received; rank 0's submitit handler then requeues the whole job)."""
        handler = self.previous.get(signum)
        self.honoured = True
        self.__exit__()
        if callable(handler):
            handler(signum, None)
        raise Interrupted(signum, step)


@contextmanager
def heartbeat(path: Path, every: float = 10.0):
    """Touch `path` every few seconds from a thread, so `sweep status` can tell a live run from a dead one."""
    done = threading.Event()

    def beat() -> None:
        while True:
            path.touch()
            if done.wait(every):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
