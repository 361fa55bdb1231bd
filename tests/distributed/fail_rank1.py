"""Launched as 2 processes by test_multiprocess.py: rank 1 fails after the process group exists,
rank 0 then waits for it in a collective. The job must end, non-zero, in bounded time."""
from mimbench import dist

ctx = dist.setup()
if ctx.rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
dist.barrier()
print("rank 0 passed the barrier")  # never reached: rank 1 is gone
