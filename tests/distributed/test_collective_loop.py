"""Two plain CPU processes (gloo): per-rank RNG streams survive a resume, a non-finite value on one rank
stops both at the same step, and every rank leaves out the same broken images."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(script: str, *args, timeout: float = 240, env=None) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ranks 0 and 1 of a 2-process gloo group; returns both processes once they ended."""
    port = str(_free_port())
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                WORLD_SIZE="2", **(env or {}))
    for name in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"):
        base.pop(name, None)
    procs = [subprocess.Popen([sys.executable, str(HERE / script), *map(str, args)], cwd=REPO,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _results(prefix: Path) -> list[dict]:
    return [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(2)]


def test_each_rank_resumes_its_own_dropout_stream(tmp_path):
    """Stopped in step 10 of 16 (epoch 2), resumed from the checkpoint of step 9: from step 10 on, each
    rank draws the dropout masks of the uninterrupted run - its own, not rank 0's."""
    full = _two_ranks("loop_ranks.py", tmp_path / "full", tmp_path / "full", "full")
    assert [p.returncode for p in full] == [0, 0], full[0].stderr[-2000:] + full[1].stderr[-2000:]
    stop = _two_ranks("loop_ranks.py", tmp_path / "part", tmp_path / "stop", "stop", 10)
    assert [p.returncode for p in stop] == [4, 4], stop[0].stderr[-2000:] + stop[1].stderr[-2000:]
    resumed = _two_ranks("loop_ranks.py", tmp_path / "part", tmp_path / "resumed", "resume")
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    want, got = _results(tmp_path / "full"), _results(tmp_path / "resumed")
    assert sorted(map(int, got[0]["masks"])) == list(range(10, 16))
    for rank in range(2):
        for it in map(str, range(10, 16)):
            assert got[rank]["masks"][it] == want[rank]["masks"][it], (rank, it)
    assert all(want[0]["masks"][it] != want[1]["masks"][it] for it in map(str, range(10, 16)))


def test_a_nan_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1 alone computes a NaN loss in step 5: both processes raise the same error naming step 5, within
    seconds (the collective timeout is 10 minutes)."""
    t0 = time.monotonic()
    procs = _two_ranks("loop_ranks.py", tmp_path / "run", tmp_path / "nan", "nan", 5, timeout=120,
                       env={"MIMBENCH_DIST_TIMEOUT": "600"})
    assert time.monotonic() - t0 < 100
    assert [p.returncode for p in procs] == [3, 3], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    errors = [r["error"] for r in _results(tmp_path / "nan")]
    assert errors[0] == errors[1] and "loss became non-finite at optimizer step 5 " in errors[0]
    assert all(sorted(map(int, r["masks"])) == list(range(5)) for r in _results(tmp_path / "nan"))


def test_every_rank_leaves_out_rank_0s_list_of_broken_images(tmp_path):
    """Rank 1 would judge one file broken, rank 0 none: both keep all files (rank 0 scans, the list is shared)."""
    from PIL import Image

    for cls in ("0", "1"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for name in ("a.png", "b.png"):
            Image.new("RGB", (4, 4), (int(cls) * 100, 0, 0)).save(tmp_path / "data" / "train" / cls / name)
    procs = _two_ranks("scan_ranks.py", tmp_path / "data", tmp_path / "scan", timeout=120)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    seen = _results(tmp_path / "scan")
    assert seen[0] == seen[1] and len(seen[0]["samples"]) == 4 and seen[0]["skipped"] == []
