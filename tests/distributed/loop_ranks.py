"""Launched as 2 plain processes (RANK / WORLD_SIZE set) by test_collective_loop.py:
``python loop_ranks.py OUT RESULT MODE [K]`` trains a small dropout model with :func:`mimbench.engine.fit`
(2 epochs of 8 steps, a checkpoint after every step) and writes ``RESULT.<rank>.json`` with the dropout
mask each optimizer step drew on this rank and the error it stopped with, if any.

MODE: ``full`` (uninterrupted), ``stop`` (stopped after step K's checkpoint: raised in step K),
``resume`` (continued from OUT), ``nan`` (rank 1 alone computes a NaN loss in step K)."""
import json
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mimbench import dist
from mimbench.engine import LoopConfig, fit
from mimbench.errors import MimbenchError

out, result, mode = sys.argv[1], sys.argv[2], sys.argv[3]
k = int(sys.argv[4]) if len(sys.argv) > 4 else -1
rank = dist.setup().rank

torch.manual_seed(0)  # the same initial weights on both ranks
net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))
g = torch.Generator().manual_seed(1)
loader = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
seen = {"mask": None, "step": 0, "masks": {}}
net[1].register_forward_hook(lambda m, i, o: seen.update(mask=(o != 0).flatten().int().tolist()))


def step(model, batch):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    if mode == "nan" and rank == 1 and seen["step"] == k:
        loss = loss * float("nan")
    return loss, {}


def on_step_end(it, total):
    seen["masks"][it] = seen["mask"]
    seen["step"] = it + 1
    if mode == "stop" and it == k:
        raise KeyboardInterrupt  # stopped: the checkpoint of step k - 1 is the last one


error, code = None, 0
try:
    fit(net, opt, loader, step, LoopConfig(epochs=2, warmup_epochs=0.5, ckpt_every_steps=1, progress=False,
                                           amp="none"), out, resume=mode == "resume", on_step_end=on_step_end)
except MimbenchError as exc:
    error, code = exc.problem, 3
except KeyboardInterrupt:
    code = 4
with open(f"{result}.{rank}.json", "w") as fh:
    json.dump({"masks": seen["masks"], "error": error}, fh)
sys.exit(code)
