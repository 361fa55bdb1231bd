"""Launched under torchrun by test_multiprocess.py: ``python killed_after_step.py K <mimbench CLI args>``
runs the CLI in every rank and SIGKILLs each rank right after its optimizer step K (no clean-up)."""
import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_post_hook

from mimbench.cli import main

kill_at, steps = int(sys.argv[1]), 0


def _count(opt, args, kwargs):
    global steps
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


register_optimizer_step_post_hook(_count)
sys.argv = ["mimbench", *sys.argv[2:]]
sys.exit(main())
