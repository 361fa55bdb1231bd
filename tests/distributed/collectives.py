"""Launched as 2 processes by test_multiprocess.py: the collective helpers and the rank-0 rule.

Rank 0 writes what it saw to the JSON file named by the first argument; every rank prints a line
(only rank 0's may reach stdout)."""
import atexit
import json
import sys

import torch

from mimbench import dist

ctx = dist.setup()
rows = torch.arange(ctx.rank + 1, dtype=torch.float32).reshape(-1, 1) + 10 * ctx.rank  # 1 row on rank 0, 2 on rank 1
gathered = dist.gather_rows(rows)
result = {
    "rank": ctx.rank, "world_size": ctx.world_size, "launcher": ctx.launcher, "device": str(ctx.device),
    "gathered": gathered.flatten().tolist(),
    "sum": float(dist.all_sum(torch.tensor(float(ctx.rank + 1)))),
    "flag": dist.broadcast_flag(ctx.rank == 0),
}
dist.barrier()
atexit._run_exitfuncs()  # what the interpreter runs at exit: the group setup formed is destroyed there
result["group_left_at_exit"] = torch.distributed.is_initialized()
print(f"rank {ctx.rank} done")
if ctx.is_main:
    with open(sys.argv[1], "w") as fh:
        json.dump(result, fh)
