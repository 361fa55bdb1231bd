"""The mmengine hooks of segmentation training on the paths a GPU or several processes take, shown on CPUs.

* resume on CUDA: mmengine's ``Runner.resume`` loads checkpoints with ``map_location='cuda'``, so the RNG
  states arrive on the GPU; here their tensors are wrapped in :class:`_OnGpu`, which refuses what a CUDA
  tensor refuses (``.numpy()``, ``.tolist()``, NumPy conversion) until it is moved with ``.cpu()``;
* every rank's RNG state in the checkpoint, each rank restoring its own;
* the non-finite-loss stop decided across ranks (2 gloo processes, rank 1 alone has a NaN loss).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.hooks import CheckpointHook

import mimbench.seg  # noqa: F401  (weights-only checkpoint loading, hook registration)
from mimbench.rng import rng_state, seed_everything
from mimbench.seg.resume import META_KEY, RngStateHook

REPO = Path(__file__).resolve().parents[2]
TWO_RANKS = Path(__file__).with_name("two_rank_hooks.py")


class _OnGpu(torch.Tensor):
    """A CPU tensor that behaves like one loaded onto a GPU: no host conversion before ``.cpu()``."""

    REFUSED = {"numpy", "tolist", "__array__", "item"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.REFUSED:
            raise TypeError(f"can't convert cuda:0 device type tensor to numpy ({name}); use Tensor.cpu() first")
        out = super().__torch_function__(func, types, args, kwargs or {})
        if name in ("cpu",) and isinstance(out, torch.Tensor):
            return out.as_subclass(torch.Tensor)
        return out


def _on_gpu(node):
    if isinstance(node, torch.Tensor):
        return node.as_subclass(_OnGpu)
    if isinstance(node, dict):
        return {k: _on_gpu(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_on_gpu(v) for v in node]
    return node


def _tensors(node):
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, (dict, list)):
        for value in node.values() if isinstance(node, dict) else node:
            yield from _tensors(value)


def _runner(it: int, *, interval: int = 2, max_iters: int = 10, rank: int = 0):
    loop = SimpleNamespace(iter=it, dataloader_iterator=iter(range(100)))
    return SimpleNamespace(iter=it, max_iters=max_iters, rank=rank, seed=0, train_loop=loop,
                           hooks=[CheckpointHook(interval=interval, by_epoch=False)])


def _draws():
    import random

    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def _saved_checkpoint(tmp_path, hook, it=3):
    """The checkpoint mmengine writes at the end of iteration ``it + 1`` (interval 2), through the hook; the
    draws each process would make next."""
    runner = _runner(it)
    hook.after_train_iter(runner, batch_idx=it)
    checkpoint = {"meta": {"iter": it + 1}}
    hook.before_save_checkpoint(runner, checkpoint)
    expected = _draws()
    path = tmp_path / "iter.pth"
    torch.save(checkpoint, path)
    return path, expected


def _load(path):
    from mmengine.runner.checkpoint import _load_checkpoint

    return _load_checkpoint(str(path), map_location="cpu")


def test_resume_restores_rng_states_loaded_onto_a_gpu(tmp_path):
    seed_everything(5)
    hook = RngStateHook()
    path, expected = _saved_checkpoint(tmp_path, hook)
    checkpoint = _on_gpu(_load(path))
    tensors = list(_tensors(checkpoint["meta"][META_KEY]))
    assert tensors and all(isinstance(t, _OnGpu) for t in tensors)
    with pytest.raises(TypeError, match="cuda"):
        tensors[0].numpy()  # the wrapper refuses as a CUDA tensor does
    seed_everything(99)  # the streams elsewhere, as after mmengine's re-seeding and data advance
    resumed = _runner(4)
    hook.after_load_checkpoint(resumed, checkpoint)
    hook.before_train(resumed)
    assert [next(resumed.train_loop.dataloader_iterator) for _ in range(4)] == [0, 1, 2, 3]  # the advance
    next(resumed.train_loop.dataloader_iterator)  # the next batch: states restored before it is read
    assert _draws() == expected


def test_states_are_gathered_at_checkpointed_iterations_only_and_saved_per_rank(tmp_path, monkeypatch):
    from mimbench.seg import resume

    calls = []
    theirs = {"python": None}  # rank 1's entry (any object: only its place in the list matters here)

    def gather():
        calls.append(1)
        return [rng_state(), theirs]

    monkeypatch.setattr(resume, "rank_states", gather)
    hook = RngStateHook()
    hook.after_train_iter(_runner(2), batch_idx=2)  # iteration 3 of interval 2: no checkpoint, no collective
    assert calls == []
    hook.after_train_iter(_runner(3), batch_idx=3)  # iteration 4: every rank joins the gather
    checkpoint = {}
    hook.before_save_checkpoint(_runner(3), checkpoint)
    saved = checkpoint["meta"][META_KEY]
    assert calls == [1] and isinstance(saved, list) and len(saved) == 2 and saved[1] is theirs
    last = {}
    hook.after_train_iter(_runner(9), batch_idx=9)  # the last iteration is saved too (save_last)
    hook.before_save_checkpoint(_runner(9), last)
    assert calls == [1, 1] and len(last["meta"][META_KEY]) == 2


def test_each_rank_restores_its_own_entry(monkeypatch):
    from mimbench.seg import resume

    restored = []
    monkeypatch.setattr(resume, "restore_rank_state",
                        lambda saved, *, rank, seed, step: restored.append((saved, rank, seed, step)))
    hook = RngStateHook()
    runner = _runner(4, rank=1)
    hook.after_load_checkpoint(runner, {"meta": {META_KEY: ["s0", "s1"]}})
    hook.before_train(runner)
    for _ in range(5):
        next(runner.train_loop.dataloader_iterator)
    assert restored == [(["s0", "s1"], 1, 0, 4)]


def _torchrun(args, out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TWO_RANKS),
           str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    proc = _torchrun([], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_each_resume_their_own_rng_streams(two_ranks):
    """Checkpoint at an interval iteration on 2 gloo processes (rank 0 writes it), both ranks scrambled, then
    resumed from it: each rank draws what it would have drawn uninterrupted, and the two differ."""
    for result in two_ranks:
        assert result["saved_entries"] == 2
        assert result["resumed"] == result["expected"]
    assert two_ranks[0]["expected"] != two_ranks[1]["expected"]


def test_two_ranks_stop_together_when_one_loss_is_nan(two_ranks):
    """Rank 1 alone has a NaN loss: both ranks raise MimbenchError at that iteration, within seconds."""
    rank0, rank1 = two_ranks
    assert rank1["raised"].startswith("The segmentation loss became non-finite at iteration 7;")
    assert rank0["raised"].startswith("The segmentation loss became non-finite at iteration 7 on another process")
    assert rank0["seconds"] < 30 and rank1["seconds"] < 30
    assert rank0["finite_iteration_raised"] is False and rank1["finite_iteration_raised"] is False
