"""The one distributed setup of every command (pretrain, eval linear / finetune / knn / segment).

:func:`setup` runs first, before any model or tensor exists, and fixes for the whole process:

* **who** - rank, world size and local rank, from the ``torchrun`` environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``) or, without torchrun, from the variables ``srun`` gives each task
  of a job step (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the master address is
  the job's first node, the port ``MASTER_PORT`` or 29500). torchrun's variables win when both are
  present (torchrun inside srun). A process inside an allocation of several tasks that srun did not
  start (the batch script itself: no ``SLURM_STEP_NUM_TASKS``, or 1) is one process on its own - it
  must not wait for peers that never start.
* **the process group** - NCCL on CUDA (after the device below is made current), gloo on CPU, with a
  finite collective timeout (``MIMBENCH_DIST_TIMEOUT`` seconds, default 1800) so that a rank that died leaves the others
  blocked for a bounded time, after which they fail and the job exits non-zero.
* **the device** - ``cuda:<local_rank>`` (made the current CUDA device), ``cuda:0`` when the
  process sees a single GPU (srun ``--gpus-per-task=1`` / ``--gpu-bind=single:1`` binds one GPU to
  each task while ``SLURM_LOCALID`` runs 0..7; :func:`choose_device`), or ``cpu``: one
  ``torch.device`` that every runner places its models and batches on. TF32 is switched on or off
  for it once (:func:`mimbench.fastpath.configure_tf32`).
* **who speaks** - rank 0 writes files and prints; the standard output of every other rank is
  discarded and its Python warnings are silenced (they repeat rank 0's). Errors (stderr) stay.

The collective helpers below (:func:`gather_rows`, :func:`all_mean`, :func:`broadcast_flag`,
:func:`broadcast_object`, :func:`barrier`) are no-ops in a single process, so the runners call them
unconditionally.
"""
from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from mimbench.errors import MimbenchError
from mimbench.fastpath import configure_tf32

__all__ = ["DistContext", "setup", "context", "dist_info", "is_main", "barrier", "gather_rows", "all_mean",
           "all_sum", "all_max", "broadcast_flag", "broadcast_object", "check_device", "choose_device",
           "destroy_group", "DEFAULT_TIMEOUT_S"]

#: Collective timeout in seconds (``MIMBENCH_DIST_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """What :func:`setup` fixed: ``rank`` / ``world_size`` / ``local_rank``, the ``device`` and the
    ``launcher`` (``"none"``, ``"pytorch"`` for torchrun, ``"slurm"`` for srun without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_CONTEXT: DistContext | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise MimbenchError(f"Environment variable {name}={value!r} is not an integer.",
                            "Launch with torchrun or srun, which set it, or unset it.") from None


def dist_info() -> tuple[int, int, int, str]:
    """``(rank, world_size, local_rank, launcher)`` from the environment, without initialising anything."""
    world = _env_int("WORLD_SIZE")
    if world is not None and world > 1:
        return _env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0, "pytorch"
    if world is not None:  # torchrun with one process: nothing to set up
        return 0, 1, _env_int("LOCAL_RANK") or 0, "none"
    # srun gives every task of a step SLURM_STEP_NUM_TASKS; the batch script of an allocation of several
    # tasks has SLURM_NTASKS > 1 too, but it is one process (without the step variable, or with 1)
    ntasks = _env_int("SLURM_STEP_NUM_TASKS")
    if ntasks is not None and ntasks > 1 and _env_int("SLURM_PROCID") is not None:
        return _env_int("SLURM_PROCID"), ntasks, _env_int("SLURM_LOCALID") or 0, "slurm"
    return 0, 1, 0, "none"


def _timeout_s() -> int:
    value = os.environ.get("MIMBENCH_DIST_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = int(float(value))
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise MimbenchError(f"MIMBENCH_DIST_TIMEOUT={value!r} is not a positive number of seconds.",
                            "Set it to e.g. 1800, or unset it.")
    return seconds


def _slurm_env(rank: int, world: int, local: int) -> None:
    """Export the variables ``init_process_group(init_method='env://')`` reads, from Slurm's."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
        addr = ""
        if nodes:
            try:
                addr = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                      check=True, timeout=60).stdout.split()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                addr = ""
        if not addr:
            raise MimbenchError(f"Cannot find the Slurm job's first node (nodelist {nodes!r}; scontrol failed).",
                                "Export MASTER_ADDR (the first node's host name) before srun, or launch with torchrun.")
        os.environ["MASTER_ADDR"] = addr
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))


def _quiet() -> None:
    """Non-zero ranks: discard standard output and warnings; errors still reach stderr."""
    sys.stdout = open(os.devnull, "w")
    warnings.simplefilter("ignore")


def setup() -> DistContext:
    """Initialise the process group (when launched as several processes) and fix the device; idempotent."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    rank, world, local, launcher = dist_info()
    device = choose_device(local)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    configure_tf32(device)
    if world > 1 and not tdist.is_initialized():
        timeout = _timeout_s()
        if launcher == "slurm":
            _slurm_env(rank, world, local)
        # the device is already chosen and current: a launcher-side set_device(local_rank) (mmengine's
        # init_dist) would fail where each task sees one GPU
        tdist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout))
        atexit.register(destroy_group)
    if world > 1 and rank != 0:
        _quiet()
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local, device=device, launcher=launcher)
    return _CONTEXT


def destroy_group() -> None:
    """Destroy the process group :func:`setup` formed (registered to run at exit). Left to the interpreter's
    teardown, the backend's threads could abort a process whose work had finished ("terminate called without an
    active exception", exit status -6: a finished job reported as failed)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def choose_device(local_rank: int) -> torch.device:
    """This process's device: ``cpu`` without CUDA; ``cuda:0`` when it sees one GPU (a launcher bound one
    GPU to each task, e.g. srun ``--gpus-per-task=1``: its local rank says nothing about the index);
    ``cuda:<local_rank>`` when it sees them all; an error when it sees several but not its own."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank < count:
        return torch.device("cuda", local_rank)
    raise MimbenchError(f"Local rank {local_rank} has no GPU: this process sees {count} GPUs "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}).",
                        "Start at most one process per visible GPU (torchrun --nproc_per_node, srun "
                        "--ntasks-per-node), bind one GPU to each task (srun --gpus-per-task=1), or check "
                        "CUDA_VISIBLE_DEVICES.")


def context() -> DistContext:
    """The context fixed by :func:`setup` (set up now when it has not been)."""
    return _CONTEXT if _CONTEXT is not None else setup()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return context().is_main


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if _active():
        tdist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is untouched)."""
    out = tensor.detach().clone()
    if _active():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks."""
    return all_sum(tensor) / (context().world_size if _active() else 1)


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks (a new tensor): e.g. "did any rank see X"."""
    out = tensor.detach().clone()
    if _active():
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; every rank must call it."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=context().device if context().device.type == "cuda" else None)
    return box[0]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (decisions that must not differ, e.g. "the cache is valid")."""
    if not _active():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=context().device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (shape ``n_r x ...``, ``n_r`` may differ) in rank order, on all ranks.

    Rows stay in each rank's order, so shards taken as contiguous ranges (``batching.shard_range``)
    come back in dataset order. The result is on the input's device.
    """
    if not _active():
        return tensor
    world = tdist.get_world_size()
    device = context().device
    local = tensor.detach().to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    tdist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


def check_device(model: torch.nn.Module, what: str = "model") -> None:
    """Raise unless every parameter and buffer of ``model`` is on this process's device.

    Called by the training loop before DDP wraps a model: a model left on another rank's GPU
    (``cuda`` instead of ``cuda:<local_rank>``) or on the CPU would otherwise train slowly or hang.
    """
    device = context().device
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device != device:
            raise MimbenchError(f"The {what}'s tensor {name!r} is on {t.device}, this process's device is {device}.",
                                "Create models after mimbench.dist.setup() and move them to its device "
                                "(mimbench.dist.context().device).")
