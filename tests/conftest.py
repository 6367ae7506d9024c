"""Fixtures shared by the test files."""
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture
def sigkill_at_first_checkpoint():
    """`kill(command, run_dir)`: run the training command, SIGKILL it as soon as run_dir/checkpoint.pt exists, and
    return that checkpoint (the run must not have finished)."""
    def kill(command: list[str], run_dir: Path) -> dict:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run_dir / "result.json").exists()
        return torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return kill
