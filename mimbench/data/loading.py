"""The loader rule: how many workers, pinned memory and prefetch every image DataLoader of the project uses.

The aim is that on a GPU the model step, not the input pipeline, is the bottleneck, without oversubscribing the
CPUs. ``mimbench bench data`` measures the two sides (decode and augment img/s per worker against a model
step's img/s) and prints how many workers a step needs; the rule that the loaders follow:

* **workers**: the config's ``data.num_workers``, capped at the CPUs one process of the job may use (the
  process's CPU affinity divided by the processes on the node, ``LOCAL_WORLD_SIZE``): more workers than CPUs
  only contend with each other and with the training process. The cap changes no result: every image's random
  augmentation is seeded by ``(seed, epoch, index)`` (:class:`mimbench.batching.SeededItems`), not by the worker.
* **pin_memory**: on CUDA only (page-locked host batches make ``.to(device, non_blocking=True)`` asynchronous);
  never on the CPU, where it only costs memory.
* **prefetch_factor**: :data:`PREFETCH_CUDA` batches per worker on CUDA, so a slow batch (a large JPEG, a heavy
  RandAugment draw) is absorbed by the queue instead of stalling the GPU; torch's default (2) on the CPU.
* **persistent_workers**: whenever there are workers (no start-up cost per epoch).
"""
from __future__ import annotations

import os

import torch

__all__ = ["PREFETCH_CUDA", "cpus_per_process", "loader_options"]

#: Batches each worker keeps ready on CUDA (torch's default is 2).
PREFETCH_CUDA = 4


def cpus_per_process() -> int:
    """The CPUs this process may run on, shared by the job's processes on this node (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(cpus // max(local, 1), 1)


def loader_options(num_workers: int, device: torch.device | str) -> dict:
    """DataLoader keyword arguments of the loader rule (module docstring) for ``num_workers`` asked for on ``device``."""
    device = torch.device(device)
    workers = min(max(int(num_workers), 0), cpus_per_process())
    options = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    if workers:
        options["prefetch_factor"] = PREFETCH_CUDA if device.type == "cuda" else 2
    return options
