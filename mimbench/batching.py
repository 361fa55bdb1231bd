"""Global batches that do not depend on the number of processes.

The rule shared by pre-training, linear probing and fine-tuning:

* **Batch sizes** (:func:`resolve_batch`): ``optim.batch_size`` is the micro-batch of one process;
  ``optim.eff_batch_size`` (when set) is the batch of one optimizer step over all processes, and
  ``accum_iter = eff_batch_size / (batch_size * world_size)`` micro-batches are accumulated to reach
  it. Without it, ``eff = batch_size * accum_iter * world_size``. The learning rate is
  ``blr * eff / 256`` unless an absolute ``lr`` is given (:func:`scaled_lr`, the MAE rule).
* **Data order** (:class:`GlobalBatchSampler`): epoch ``e``'s order is a permutation that is a pure
  function of ``(seed, e)``. Optimizer step ``t`` takes the ``eff`` images ``order[t*eff:(t+1)*eff]``;
  they are cut into ``world * accum`` chunks of ``batch_size`` and rank ``r`` processes chunks
  ``r*accum .. r*accum + accum - 1`` as its micro-batches, in that order. So the images of every
  optimizer step - and the split into micro-batches of ``batch_size`` - are the same on any number
  of processes: micro-batch ``k`` of a 1-process run with ``accum_iter = N`` holds exactly rank
  ``k``'s slice of an ``N``-process run. (A batch-norm head therefore sees the same batches.)
* **Per-image randomness** (:func:`uniform_by_index`, :class:`SeededItems`): random numbers for an
  image are a function of ``(seed, epoch, image index)`` (and a stream name), never of the rank or
  of the position in a batch.
* **Evaluation shards** (:func:`shard_range`): rank ``r`` scores a contiguous range of the
  validation set; the ranges partition it, so each image is scored exactly once (no padding
  duplicates as with ``DistributedSampler``), and gathering in rank order restores dataset order.
"""
from __future__ import annotations

import functools
import random
from typing import Iterator, Mapping

import numpy as np
import torch

from mimbench.errors import MimbenchError

__all__ = ["resolve_batch", "scaled_lr", "epoch_order", "GlobalBatchSampler", "shard_range", "uniform_by_index",
           "item_seed", "SeededItems", "seed_batch", "stream_id"]

_MASK32 = 0xFFFFFFFF


def resolve_batch(optim: Mapping, world_size: int) -> tuple[int, int, int]:
    """``(micro-batch per process, accum_iter, effective batch)`` from ``optim.batch_size`` /
    ``accum_iter`` / ``eff_batch_size`` and the number of processes."""
    batch = int(optim["batch_size"])
    world_size = int(world_size)
    if batch < 1:
        raise MimbenchError(f"optim.batch_size={batch} must be positive.", "Set optim.batch_size to at least 1.")
    eff = optim.get("eff_batch_size")
    if not eff:
        accum = int(optim.get("accum_iter", 1) or 1)
        return batch, accum, batch * accum * world_size
    eff = int(eff)
    if eff % (batch * world_size):
        raise MimbenchError(
            f"optim.eff_batch_size={eff} is not a multiple of optim.batch_size={batch} x world size {world_size}.",
            "Change optim.batch_size (per process) or the number of processes so that batch_size x processes "
            "divides optim.eff_batch_size.")
    return batch, eff // (batch * world_size), eff


def scaled_lr(optim: Mapping, eff_batch: int) -> float:
    """``optim.lr`` when set, else ``optim.blr * eff_batch / 256`` (MAE's linear scaling rule)."""
    if optim.get("lr") is not None:
        return float(optim["lr"])
    if optim.get("blr") is None:
        raise MimbenchError("The config sets neither optim.lr nor optim.blr.",
                            "Set optim.blr (base rate per 256 images) or optim.lr (absolute).")
    return float(optim["blr"]) * int(eff_batch) / 256


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Permutation of ``range(n)`` for ``epoch``: a pure function of ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(int(n), generator=g)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batch sampler of this rank's micro-batches (lists of dataset indices); see the module docstring.

    ``len()`` = micro-batches per epoch on this rank = ``(n // eff) * accum_iter`` (the last partial
    global batch is dropped). ``set_epoch(e)`` selects the epoch; ``iter_from(k)`` starts at
    micro-batch ``k``. With ``with_epoch=True`` each index is yielded as ``(epoch, index)`` for
    :class:`SeededItems`.
    """

    def __init__(self, n: int, batch_size: int, accum_iter: int = 1, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, with_epoch: bool = False):
        self.n, self.batch_size, self.accum = int(n), int(batch_size), int(accum_iter)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        self.shuffle, self.with_epoch = bool(shuffle), bool(with_epoch)
        self.eff = self.batch_size * self.accum * self.world
        self.epoch = 0
        if self.n // self.eff < 1:
            raise MimbenchError(
                f"{self.n} samples give no full global batch of {self.eff} (batch_size {self.batch_size} x "
                f"accum_iter {self.accum} x {self.world} processes).",
                "Lower optim.batch_size / optim.eff_batch_size or use more data.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (self.n // self.eff) * self.accum

    def __iter__(self) -> Iterator[list]:
        return self.iter_from(0)

    def iter_from(self, first: int) -> Iterator[list]:
        """This rank's micro-batches of the current epoch from micro-batch ``first`` on (a mid-epoch
        resume): the order is a function of ``(seed, epoch)``, so the skipped ones are not drawn."""
        order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        order = order.tolist()
        first = max(int(first), 0)
        for t in range(first // self.accum, self.n // self.eff):
            for k in range(first - t * self.accum if t == first // self.accum else 0, self.accum):
                start = t * self.eff + (self.rank * self.accum + k) * self.batch_size
                chunk = order[start:start + self.batch_size]
                yield [(self.epoch, i) for i in chunk] if self.with_epoch else chunk


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous part of ``range(n)``; the parts of all ranks partition it."""
    n, rank, world_size = int(n), int(rank), int(world_size)
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: int) -> int:
    """:func:`_hash32` on one Python integer: the same bits, without a tensor per call (hot loops
    seed every image of every batch)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=64)
def stream_id(name: str) -> int:
    """A stable 32-bit number for a stream name ("mask", "crop", ...)."""
    value = 0
    for byte in name.encode():
        value = _mix32(value * 131 + byte)
    return value


@functools.lru_cache(maxsize=1024)
def _key(seed: int, epoch: int, stream: str) -> int:
    return _mix32(_mix32((int(seed) & _MASK32) ^ stream_id(stream)) + (int(epoch) & _MASK32))


def uniform_by_index(seed: int, epoch: int, index: torch.Tensor, width: int, stream: str,
                     device=None) -> torch.Tensor:
    """``len(index) x width`` float32 numbers, uniform in [0, 1) on a 2**-24 grid, row ``i`` a pure
    function of ``(seed, epoch, index[i], stream)``: the same on any rank, in any batch, on any device."""
    idx = torch.as_tensor(index, dtype=torch.int64, device=device).reshape(-1, 1)
    key = _key(int(seed), int(epoch), stream)
    row = _hash32(idx + key)
    col = torch.arange(int(width), dtype=torch.int64, device=idx.device).reshape(1, -1)
    bits = _hash32(_hash32(row ^ (col * 0x9E3779B1 & _MASK32)) + col)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def item_seed(seed: int, epoch: int, index: int, stream: str = "item") -> int:
    """A 32-bit seed that is a pure function of ``(seed, epoch, index, stream)``."""
    return _mix32(_key(int(seed), int(epoch), stream) + (int(index) & _MASK32))


def seed_batch(seed: int, epoch: int, index: torch.Tensor, stream: str = "batch") -> None:
    """Seed Python's ``random``, NumPy's and torch's global generators (CPU and the current CUDA
    device) from ``(seed, epoch, first index of the micro-batch)``.

    For randomness drawn per batch by libraries that use the global generators (timm ``Mixup``,
    stochastic depth, ``RandomErasing`` on batches): the micro-batches are the same chunks on any
    number of processes, so these draws are too.
    """
    first = int(torch.as_tensor(index).reshape(-1)[0])
    s = item_seed(seed, epoch, first, stream)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class SeededItems(torch.utils.data.Dataset):
    """A dataset whose item ``i`` is drawn with the global RNGs seeded from ``(seed, epoch, i)``.

    Indexed with ``(epoch, i)`` (as :class:`GlobalBatchSampler` yields with ``with_epoch=True``),
    it returns ``(*dataset[i], i)``: the random crop / flip / RandAugment of image ``i`` is then the
    same whichever rank or DataLoader worker loads it. The caller's RNG state is restored afterwards.
    """

    def __init__(self, dataset, seed: int, stream: str = "item"):
        self.dataset, self.seed, self.stream = dataset, int(seed), stream
        for name in ("classes",):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        s = item_seed(self.seed, epoch, index, self.stream)
        random.seed(s)
        np.random.seed(s)
        torch.random.default_generator.manual_seed(s)  # CPU only: the transforms run on the CPU
        try:
            item = self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
        if not isinstance(item, tuple):
            item = (item,)
        return (*item, index)
