"""Launched as 2 gloo processes by test_seg_hooks.py: the segmentation hooks where ranks differ.

1. RngStateHook: each rank seeds differently, trains to a checkpointed iteration (states gathered in
   after_train_iter on every rank), rank 0 writes the checkpoint; every rank then scrambles its streams,
   loads it and resumes; the draws after the restore are compared with those made right after saving.
2. NonFiniteLossHook: one finite iteration on both ranks, then one where only rank 1's loss is NaN.

Each rank writes ``rank<r>.json`` into the folder named by the first argument.
"""
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from mmengine.hooks import CheckpointHook

import mimbench.seg  # noqa: F401  (weights-only checkpoint loading, hook registration)
from mimbench import dist
from mimbench.errors import MimbenchError
from mimbench.rng import seed_everything
from mimbench.seg.resume import META_KEY, RngStateHook
from mimbench.seg.safety import NonFiniteLossHook

out = Path(sys.argv[1])
ctx = dist.setup()
result = {"rank": ctx.rank}


def runner(it):
    loop = SimpleNamespace(iter=it, dataloader_iterator=iter(range(100)))
    return SimpleNamespace(iter=it, max_iters=10, rank=ctx.rank, seed=0, train_loop=loop, work_dir=str(out),
                           hooks=[CheckpointHook(interval=2, by_epoch=False)])


def draws():
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


# 1. per-rank RNG state through a checkpoint
seed_everything(100 + ctx.rank)
hook = RngStateHook()
hook.after_train_iter(runner(3), batch_idx=3)  # iteration 4: a CheckpointHook (interval 2) saves after it
path = out / "iter_4.pth"
if ctx.is_main:  # mmengine's save_checkpoint is master-only
    checkpoint = {"meta": {"iter": 4}}
    hook.before_save_checkpoint(runner(3), checkpoint)
    torch.save(checkpoint, path)
result["expected"] = draws()
dist.barrier()
seed_everything(7)  # the same scrambled streams on both ranks
from mmengine.runner.checkpoint import _load_checkpoint  # noqa: E402

loaded = _load_checkpoint(str(path), map_location="cpu")
result["saved_entries"] = len(loaded["meta"][META_KEY])
resumed = runner(4)
fresh = RngStateHook()
fresh.after_load_checkpoint(resumed, loaded)
fresh.before_train(resumed)
for _ in range(5):  # mmengine's advance over 4 batches, then the next batch
    next(resumed.train_loop.dataloader_iterator)
result["resumed"] = draws()

# 2. the non-finite stop, decided together
guard = NonFiniteLossHook()
try:
    guard.after_train_iter(runner(5), batch_idx=5, outputs={"loss": torch.tensor(0.5)})
    result["finite_iteration_raised"] = False
except MimbenchError:
    result["finite_iteration_raised"] = True
loss = torch.tensor(float("nan") if ctx.rank == 1 else 0.25)
start = time.monotonic()
try:
    guard.after_train_iter(runner(6), batch_idx=6, outputs={"loss": loss, "decode.loss_ce": torch.tensor(0.2)})
    result["raised"] = None
except MimbenchError as err:
    result["raised"] = err.problem
result["seconds"] = time.monotonic() - start
(out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
dist.barrier()
