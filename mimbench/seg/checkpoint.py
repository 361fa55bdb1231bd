"""Weights-only loading of mmengine checkpoints (``eval segment --resume``).

mmengine 0.10.7 reads every local checkpoint -- the one ``Runner.resume`` picks from
``work_dir/last_checkpoint``, ``load_from`` and the backbone's ``init_cfg=Pretrained``
file -- through ``CheckpointLoader``'s local scheme, which calls ``torch.load(filename,
map_location=...)`` without a ``weights_only`` argument. The safety of that call
therefore rests on torch's default: since torch 2.6 it is ``weights_only=True``, which
refuses the non-tensor objects a training checkpoint holds (the message hub's
:class:`mmengine.logging.HistoryBuffer`, numpy arrays, dtypes and scalars), so resuming
failed with ``UnpicklingError: ... GLOBAL mmengine.logging.history_buffer.HistoryBuffer
was not an allowed global``; and the environment variable
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` silently turns the same call into a full pickle
load, which runs whatever code the file names.

:func:`install` replaces that local scheme (``CheckpointLoader.register_scheme`` with
``force=True``, mmengine's own extension point) by :func:`load_from_local_weights_only`,
which passes ``weights_only=True`` explicitly -- torch ignores the environment override
when the caller sets it -- and allows, only while that call runs, exactly the plain
data types mmengine checkpoints hold (:func:`allowed_globals`):

* ``HistoryBuffer``, through :class:`_CheckedHistoryBuffer`: its state must be the
  buffer's fields (``max_length``, an int; the two histories, numeric numpy arrays) and
  its statistics methods must be HistoryBuffer's own ``min``/``max``/``current``/
  ``mean``; anything else is refused before mmengine's ``__setstate__`` could write it
  into the class-wide registry of statistics methods. The object that results is a
  plain ``HistoryBuffer``.
* ``getattr``, which pickle uses to name a method (``getattr(HistoryBuffer, "mean")``),
  only as :func:`_history_buffer_method`: the four statistics methods of
  ``HistoryBuffer`` and nothing else. The real ``getattr`` is never allowed: with it a
  file could reach any attribute of any object it can build -- a function's
  ``__globals__``, i.e. a module's namespace -- and the unpickler may write into any
  dict, so the file could rebind names that code calls later.
* numpy arrays (``_reconstruct``, ``ndarray``), scalars (``scalar``) and dtypes
  (``dtype`` and the DType classes of bool, integer, float and complex dtypes) --
  constructors of plain numbers. The DType classes of object, string and datetime
  dtypes are not among them.

None of these names a function that imports a module, runs a command or touches a
file, so a checkpoint that asks for anything else (``os.system``, ``exec``, ...) is still
refused by torch's weights-only unpickler with ``pickle.UnpicklingError``. The
allow-list is not added to torch's process-wide list: a plain ``torch.load`` elsewhere
keeps torch's own defaults.

Checkpoints from other schemes (``http://``, ``s3://``, ...) keep mmengine's loaders.
"""

from __future__ import annotations

import os.path as osp
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

#: HistoryBuffer's statistics methods that a checkpoint may name.
STATISTICS = ("min", "max", "current", "mean")
#: The instance fields of a pickled HistoryBuffer (besides ``statistics_methods``).
_HISTORY_FIELDS = {"max_length", "_log_history", "_count_history"}
#: numpy dtype kinds whose arrays/scalars may be loaded: bool, int, uint, float, complex.
NUMERIC_KINDS = "biufc"


def _history_buffer_method(obj, name):
    """Stands in for ``getattr`` while loading: only ``HistoryBuffer.<statistic>``."""
    if not (obj is HistoryBuffer or obj is _CheckedHistoryBuffer) or name not in STATISTICS:
        raise pickle.UnpicklingError(
            f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint; only "
            f"HistoryBuffer.{{{','.join(STATISTICS)}}} are.")
    return vars(HistoryBuffer)[name]


def _numeric_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in NUMERIC_KINDS


class _CheckedHistoryBuffer(HistoryBuffer):
    """Loads as ``HistoryBuffer`` after checking the pickled state field by field."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"HistoryBuffer state must be a dict, not {type(state).__name__}.")
        methods = state.get("statistics_methods", {})
        fields = set(state) - {"statistics_methods"}
        problems = []
        if fields != _HISTORY_FIELDS:
            problems.append(f"fields {sorted(fields)} instead of {sorted(_HISTORY_FIELDS)}")
        elif type(state["max_length"]) is not int:
            problems.append("max_length is not an int")
        elif not (_numeric_array(state["_log_history"]) and _numeric_array(state["_count_history"])):
            problems.append("the histories are not numeric numpy arrays")
        if not isinstance(methods, dict) or any(
                name not in STATISTICS or method is not vars(HistoryBuffer)[name] for name, method in methods.items()):
            problems.append("statistics methods other than HistoryBuffer's own")
        if problems:
            raise pickle.UnpicklingError("Refusing a HistoryBuffer in the checkpoint: " + "; ".join(problems) + ".")
        self.__class__ = HistoryBuffer
        HistoryBuffer.__setstate__(self, dict(state))


def allowed_globals() -> list:
    """The globals (or ``(stand-in, pickled name)`` pairs) allowed while loading a checkpoint."""
    from numpy._core import multiarray

    dtype_classes = sorted({type(np.dtype(code)) for code in np.typecodes["All"]
                            if np.dtype(code).kind in NUMERIC_KINDS}, key=lambda c: c.__name__)
    allowed = [
        (_CheckedHistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
        (_history_buffer_method, "builtins.getattr"),
        np.ndarray,
        np.dtype,
        *dtype_classes,
    ]
    # Checkpoints written with numpy 1.x name numpy.core.multiarray.*, with numpy 2.x numpy._core.multiarray.*.
    for name in ("_reconstruct", "scalar"):
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            allowed.append((getattr(multiarray, name), f"{module}.{name}"))
    return allowed


def load_from_local_weights_only(filename, map_location=None):
    """mmengine's local checkpoint loader with ``weights_only=True`` and :func:`allowed_globals`."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    # Leave out what is allowed already: leaving the context removes what it added.
    present = set(torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals([g for g in allowed_globals() if g not in present]):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install() -> None:
    """Make mmengine load local checkpoints with :func:`load_from_local_weights_only` (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local_weights_only, force=True)
