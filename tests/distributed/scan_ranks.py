"""Launched as 2 plain processes by test_collective_loop.py: ``python scan_ranks.py ROOT RESULT`` builds
the image folder ROOT/train; rank 1 would judge ``0/b.png`` broken (patched scan). Writes the files each
rank kept and skipped to ``RESULT.<rank>.json``."""
import json
import sys

from mimbench import dist
from mimbench.data import folders

root, result = sys.argv[1], sys.argv[2]
rank = dist.setup().rank
if rank == 1:
    real = folders.image_problem
    folders.image_problem = lambda path: "patched: broken on rank 1" if str(path).endswith("b.png") else real(path)
ds = folders.image_folder(root, "train", max_bad_fraction=1.0)
with open(f"{result}.{rank}.json", "w") as fh:
    json.dump({"samples": [p for p, _ in ds.samples], "skipped": ds.skipped}, fh)
