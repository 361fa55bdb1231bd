"""Random-number state: seeding, saving and restoring every global stream, one stream set per rank.

A checkpoint must let each process continue with *its own* streams: dropout, drop path and the
decoder's attention dropout draw from the global torch (and CUDA) generators, which differ per rank.
:func:`rank_states` therefore collects every rank's state (one collective; rank r's entry at index r)
and :func:`restore_rank_state` gives rank r entry r back, so a resumed N-process run continues exactly
as an uninterrupted one. A checkpoint written by another number of processes (or an older single-state
checkpoint) cannot hand each rank its own stream: the ranks beyond what was saved are re-seeded from
(seed, rank, step), never from another rank's state.

States hold tensors and primitives only (they load with ``torch.load(weights_only=True)``), and may
arrive on any device (mmengine's resume loads with ``map_location='cuda'``): :func:`set_rng_state`
moves them to the CPU first, as ``torch.set_rng_state`` and NumPy need.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as tdist

__all__ = ["seed_everything", "rng_state", "set_rng_state", "rank_states", "restore_rank_state", "derived_seed"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and all CUDA devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derived_seed(seed: int, rank: int, step: int) -> int:
    """A seed that is a fixed function of (seed, rank, step), different for every rank."""
    return (int(seed) * 1_000_003 + int(rank) * 7_919 + int(step) * 104_729) % (2**63 - 1)


def _cpu(t):
    return t.detach().cpu() if isinstance(t, torch.Tensor) else torch.as_tensor(t)


def rng_state() -> dict:
    """This process's global RNG states as tensors / primitives (loadable with ``weights_only=True``).

    On CUDA only the current device's generator is saved: one process drives one device.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` returned, whatever device its tensors were loaded onto."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in _cpu(py["state"]).tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", _cpu(npst["keys"]).numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(_cpu(state["torch"]).to(torch.uint8))
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(_cpu(state["cuda_device"]).to(torch.uint8))
        elif "cuda" in state:  # older checkpoints: every device of the writing process; ours is the current one
            saved = list(state["cuda"])
            index = torch.cuda.current_device()
            if index < len(saved):
                torch.cuda.set_rng_state(_cpu(saved[index]).to(torch.uint8))


def rank_states() -> list[dict]:
    """Every rank's :func:`rng_state`, index = rank (one collective; a single process gives one entry).

    Every rank must call it; each receives the whole list (rank 0 writes it into the checkpoint).
    """
    mine = rng_state()
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [mine]
    gathered: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, mine)
    return gathered


def restore_rank_state(saved, *, rank: int, seed: int, step: int) -> str:
    """Give rank ``rank`` its own saved stream back; returns how (``"restored"`` or ``"reseeded"``).

    ``saved`` is what :func:`rank_states` returned (a list, index = rank) or, from older checkpoints, one
    state. Rank r restores entry r; a rank with no entry of its own (the run was written by fewer
    processes, or as one shared state) is re-seeded from :func:`derived_seed` instead of copying another
    rank's streams (which would make ranks draw the same dropout masks).
    """
    states: Sequence = saved if isinstance(saved, (list, tuple)) else [saved]
    if isinstance(saved, Mapping) and rank != 0:
        seed_everything(derived_seed(seed, rank, step))
        return "reseeded"
    if rank < len(states) and states[rank] is not None:
        set_rng_state(states[rank])
        return "restored"
    seed_everything(derived_seed(seed, rank, step))
    return "reseeded"
