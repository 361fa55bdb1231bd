"""Fault injection helpers: run code in a child process that SIGKILLs itself after optimizer step k."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The child counts optimizer steps through torch's global step hook and kills itself with SIGKILL
# (no clean-up, no atexit, no flush) right after step ``MIMBENCH_TEST_KILL_AT``.
_CHILD = r"""
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
kill_at = int(os.environ.get("MIMBENCH_TEST_KILL_AT", "0"))
steps = 0
def _count(opt, args, kwargs):
    global steps
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(_count)
exec(sys.argv[1])
"""


def run_child(code: str, kill_at: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, MIMBENCH_TEST_KILL_AT=str(kill_at), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", _CHILD, code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


@pytest.fixture
def killed_run():
    """``killed_run(code, kill_at)``: run ``code`` in a child SIGKILLed after optimizer step ``kill_at``."""

    def run(code: str, kill_at: int):
        proc = run_child(code, kill_at)
        assert proc.returncode == -9, f"child was not killed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        return proc

    return run
