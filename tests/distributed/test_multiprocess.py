"""1 process vs 2 processes (torchrun, gloo on CPU): the same numbers, one writer, quiet non-zero ranks.

Every 2-process run is a real ``torchrun --standalone --nproc_per_node=2 -m mimbench.cli ...`` launch;
the 1-process reference runs in this process with the same effective batch.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

MAE = str(REPO / "pretrain" / "configs" / "mae_micro_fmnist.py")
LINEAR_DEMO = str(REPO / "eval_configs" / "demo" / "linear_fmnist.py")
LINEAR_PROTOCOL = str(REPO / "eval_configs" / "linear" / "mae_vit-b_in1k.py")
FINETUNE_DEMO = str(REPO / "eval_configs" / "demo" / "finetune_fmnist.py")
KNN_DEMO = str(REPO / "eval_configs" / "demo" / "knn_fmnist.py")
SEG_DEMO = str(REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py")


def torchrun(args, nproc: int, log_dir: Path, *, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc -m mimbench.cli *args`` with each rank's stdout and
    stderr kept apart under ``log_dir`` (see :func:`rank_output`). ``args`` starting with ``--script``
    run that Python file instead of the CLI."""
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS"):
        run_env.pop(name, None)
    target = ["-m", "mimbench.cli", *args] if args[0] != "--script" else list(args[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(log_dir), "--redirects", "3", *target]
    return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)


def rank_output(log_dir: Path, rank: int, stream: str = "stdout") -> str:
    """What rank ``rank`` wrote to ``stream`` in the torchrun launch that logged to ``log_dir``."""
    files = sorted(Path(log_dir).rglob(f"attempt_*/{rank}/{stream}.log"))
    assert files, f"no {stream} log of rank {rank} under {log_dir}"
    return "".join(f.read_text() for f in files)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _records(out):
    return sorted(p for p in out.glob("*.json"))


def _two_procs(tmp_path, name, args):
    """Run the CLI on 2 processes; assert success, rank 1 silent on stdout and stderr; return rank 0's stdout."""
    logs = tmp_path / f"{name}-logs"
    proc = torchrun(args, 2, logs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rank_output(logs, 1, "stdout") == ""
    assert rank_output(logs, 1, "stderr") == ""
    return rank_output(logs, 0, "stdout")


def _one_and_two(tmp_path, encoder, task, config, common):
    """Evaluation ``task`` of ``encoder`` with ``config`` and the ``common`` overrides, in this process and then on 2
    processes through the CLI: (the one-process record, the two-process record, rank 0's stdout)."""
    from mimbench.evals import run_eval

    one = run_eval(task, encoder=encoder, config=config, data="builtin:fashion-mnist", out=tmp_path / "one",
                   overrides=common)
    stdout = _two_procs(tmp_path, task, ["eval", task, "--encoder", str(encoder), "--config", config,
                                         "--out", str(tmp_path / "two"), *_sets(common)])
    (written,) = _records(tmp_path / "two")
    return one, json.loads(written.read_text()), stdout


def test_pretrain_two_processes_equal_one(tmp_path):
    """MAE micro: 1 process at batch 16 = 2 processes at 8 each (losses and encoder to 1e-5, fp32)."""
    from safetensors.torch import load_file

    from pretrain.main import run_pretrain

    common = ["data.limit=128", "schedule.epochs=2", "schedule.warmup_epochs=0.5", "runtime.log_every=1",
              "runtime.amp='none'", "optim.eff_batch_size=16"]
    one = run_pretrain(MAE, out=tmp_path / "one", overrides=common + ["optim.batch_size=16"])
    stdout = _two_procs(tmp_path, "pretrain", ["pretrain", "--config", MAE, "--out", str(tmp_path / "two"),
                                               *_sets(common + ["optim.batch_size=8"])])
    assert stdout.count("encoder written to") == 1 and "step 16/16" in stdout  # plain log lines (not a terminal)
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r["it"] for r in logs[0]] == [r["it"] for r in logs[1]] == list(range(1, 17))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    enc1, enc2 = load_file(str(one)), load_file(str(tmp_path / "two" / "encoder.safetensors"))
    assert enc1.keys() == enc2.keys()
    assert max(float((enc1[k] - enc2[k]).abs().max()) for k in enc1) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == ["encoder.safetensors"]


def test_linear_cached_two_processes_equal_one(tmp_path, dist_encoder):
    """Cached linear probe: metrics and head of 2 processes x 32 = 1 process x 32 x accum 2, to 1e-5."""

    common = ["data.limit_train=512", "data.limit_val=200", "schedule.epochs=3", "schedule.warmup_epochs=1",
              "optim.batch_size=32", "optim.eff_batch_size=64", "runtime.log_every=2"]
    one, two, _ = _one_and_two(tmp_path, dist_encoder, "linear", LINEAR_DEMO, common)
    assert one["protocol"]["accum_iter"] == 2
    assert two["protocol"]["accum_iter"] == 1 and two["hardware"]["count"] == 2
    for key in ("top1", "top5", "train_loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-5)
    heads = [torch.load(tmp_path / d / "checkpoint-latest.pt", weights_only=True)["model"] for d in ("one", "two")]
    for key in heads[0]:  # BN running statistics included: replayed in global order on every rank
        assert torch.allclose(heads[0][key].double(), heads[1][key].double(), atol=1e-5), key
    cache = sorted(p.name for p in (tmp_path / "two" / "feature_cache").iterdir())
    # train/val features + labels, once, each split with the manifest of what it was built from
    assert len(cache) == 6 and sum(n.endswith(".npy") for n in cache) == 4
    assert sum(n.endswith(".manifest.json") for n in cache) == 2


def test_linear_two_processes_killed_mid_epoch_resume_to_one_process_numbers(tmp_path, dist_encoder):
    """Both ranks killed inside the last epoch, resumed from the mid-epoch checkpoint on 2 processes: the
    epoch's training loss (all-reduced over ranks, partly from before the kill) and the metrics are
    those of one uninterrupted process."""
    from mimbench.evals import run_eval

    common = ["data.limit_train=512", "data.limit_val=200", "schedule.epochs=3", "schedule.warmup_epochs=1",
              "optim.batch_size=32", "optim.eff_batch_size=64", "runtime.log_every=2", "runtime.ckpt_every_steps=3"]
    one = run_eval("linear", encoder=dist_encoder, config=LINEAR_DEMO, data="builtin:fashion-mnist",
                   out=tmp_path / "one", overrides=common)
    args = ["eval", "linear", "--encoder", str(dist_encoder), "--config", LINEAR_DEMO, "--out",
            str(tmp_path / "two"), *_sets(common)]
    # 8 steps per epoch: killed after step 20 (epoch 3, in-epoch step 4), the checkpoint of step 19 survives
    killed = torchrun(["--script", str(REPO / "tests" / "distributed" / "killed_after_step.py"), "20", *args], 2,
                      tmp_path / "killed-logs")
    assert killed.returncode != 0
    ck = torch.load(tmp_path / "two" / "checkpoint-latest.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (2, 3)
    assert not _records(tmp_path / "two")
    _two_procs(tmp_path, "resumed", [*args, "--resume"])
    (written,) = _records(tmp_path / "two")
    two = json.loads(written.read_text())
    for key in ("top1", "top5", "train_loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-5)


def test_knn_two_processes_equal_one_exactly(tmp_path, dist_encoder):
    common = ["data.limit_train=600", "data.limit_val=201", "batch_size=64"]
    one, two, stdout = _one_and_two(tmp_path, dist_encoder, "knn", KNN_DEMO, common)
    assert stdout.count("knn: top1=") == 1
    assert (two["metrics"]["top1"], two["metrics"]["top5"]) == (one["metrics"]["top1"], one["metrics"]["top5"])
    assert two["dataset"]["sizes"] == {"train": 600, "val": 201}
    # each rank built the whole bank on its device and voted for its own slice of the 201 queries only
    assert two["protocol"]["bank"] == one["protocol"]["bank"] == {"dtype": "float32", "device": "cpu",
                                                                  "rows": 600, "dim": 32}
    assert one["protocol"]["vote"]["queries_per_rank"] == [201]
    assert two["protocol"]["vote"]["queries_per_rank"] == [100, 101]



def test_knn_in_cpu_bf16_two_processes_agree_with_one(tmp_path, dist_encoder, monkeypatch):
    """Under bf16 on the CPU (timm's explicit attention, mimbench.fastpath.attention_fused) k-NN on two processes
    agrees with one process, and both records name the precision and the attention kernel."""
    from mimbench import fastpath

    monkeypatch.setenv("MIMBENCH_CPU_BF16", "1")  # the torchrun processes inherit it
    common = ["data.limit_train=600", "data.limit_val=201", "batch_size=64"]
    one, two, _ = _one_and_two(tmp_path, dist_encoder, "knn", KNN_DEMO, common)
    for record in (one, two):
        assert record["hardware"]["precision"] == "bf16"
        assert fastpath.EXPLICIT_ATTENTION in record["hardware"]["precision_reason"]
    assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=1.0)  # bf16: 2 of 201 images at most

# Protocol linear probe and fine-tuning: the two runs see the same images with the same augmentation
# and per-batch draws, and differ only in the floating-point order of the gradient sums (all-reduce
# of two micro-batch gradients vs accumulation), ~1e-7 relative per step. Over a few steps that
# can move a prediction only where two logits are within that noise: we allow 1 % of the 200
# validation images (2 images) and 1e-3 on the training loss.
ACC_TOL, LOSS_TOL = 1.0, 1e-3


def test_linear_protocol_two_processes_complete_and_agree(tmp_path, dist_encoder):
    common = ["img_size=32", "optim.batch_size=8", "optim.eff_batch_size=16", "schedule.epochs=2",
              "schedule.warmup_epochs=1", "data.limit_train=64", "data.limit_val=200", "runtime.progress=False",
              "data.num_workers=0"]
    one, two, _ = _one_and_two(tmp_path, dist_encoder, "linear", LINEAR_PROTOCOL, common)
    assert two["protocol"]["mode"] == "protocol" and two["dataset"]["sizes"]["val"] == 200
    assert abs(two["metrics"]["top1"] - one["metrics"]["top1"]) <= ACC_TOL
    assert two["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], abs=LOSS_TOL)


def test_finetune_two_processes_complete_and_agree(tmp_path, dist_encoder):
    common = ["optim.batch_size=16", "optim.eff_batch_size=32", "schedule.epochs=2", "schedule.warmup_epochs=1",
              "data.limit_train=128", "data.limit_val=200"]
    one, two, _ = _one_and_two(tmp_path, dist_encoder, "finetune", FINETUNE_DEMO, common)
    assert two["protocol"]["accum_iter"] == 1 and one["protocol"]["accum_iter"] == 2
    assert abs(two["metrics"]["top1"] - one["metrics"]["top1"]) <= ACC_TOL
    assert two["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], abs=LOSS_TOL)


def test_segment_completes_under_torchrun_with_one_record(tmp_path, dist_encoder):
    stdout = _two_procs(tmp_path, "seg", ["eval", "segment", "--encoder", str(dist_encoder), "--config", SEG_DEMO,
                                          "--data", "builtin:fashion-mnist-seg", "--out", str(tmp_path / "seg"),
                                          "--no-aug-test", *_sets(["train_cfg.max_iters=2",
                                                                   "train_dataloader.batch_size=2"])])
    assert stdout.count("segment: {") == 1
    (written,) = _records(tmp_path / "seg")
    record = json.loads(written.read_text())
    assert record["task"] == "segment" and record["hardware"]["count"] == 2
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0


def test_a_failing_rank_ends_the_job_non_zero(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: torchrun ends the job with a non-zero status."""
    proc = torchrun(["--script", str(REPO / "tests" / "distributed" / "fail_rank1.py")], 2, tmp_path / "logs",
                    timeout=300)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in rank_output(tmp_path / "logs", 1, "stderr")
    assert "passed the barrier" not in rank_output(tmp_path / "logs", 0, "stdout")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(script, env_for_rank, args=()):
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "SLURM_STEP_NUM_TASKS"):
        base.pop(name, None)
    return [subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env={**base, **env_for_rank(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]


def test_without_torchrun_the_collective_timeout_ends_a_waiting_rank(tmp_path):
    """Plain processes (no launcher to kill the survivors): rank 0 fails once rank 1 is gone, at the
    latest after the collective timeout (MIMBENCH_DIST_TIMEOUT)."""
    port = str(_free_port())
    procs = _spawn(REPO / "tests" / "distributed" / "fail_rank1.py",
                   lambda r: {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": port, "MIMBENCH_DIST_TIMEOUT": "20"})
    codes = [p.wait(timeout=300) for p in procs]
    assert codes[0] != 0 and codes[1] != 0


def test_slurm_environment_without_torchrun(tmp_path):
    """srun-style variables only (SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NUM_TASKS / SLURM_LOCALID): the
    group forms, the collectives work, rank 1 prints nothing, and the group is destroyed at exit (left to the
    interpreter's teardown, gloo could abort a rank that had finished: exit status -6)."""
    port, result = str(_free_port()), tmp_path / "result.json"
    procs = _spawn(REPO / "tests" / "distributed" / "collectives.py",
                   lambda r: {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                              "SLURM_LOCALID": str(r),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, args=[str(result)])
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].strip() == "rank 0 done" and outs[1][0] == ""
    seen = json.loads(result.read_text())
    assert seen == {"rank": 0, "world_size": 2, "launcher": "slurm", "device": "cpu",
                    "gathered": [0.0, 10.0, 11.0], "sum": 3.0, "flag": True, "group_left_at_exit": False}
