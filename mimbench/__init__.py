"""mimbench: standardized evaluations of masked-image-modelling ViT encoders.

The Python API (docs/api.md): :func:`pretrain` and :func:`evaluate` (:mod:`mimbench.api`, the functions the
command line calls) and :func:`load_encoder` (an encoder file or checkpoint as a timm model).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load_encoder", "pretrain", "save_encoder"]


def __getattr__(name: str):
    # Lazy so that `import mimbench` (and the CLI's --help) does not pay for torch/timm, nor for mmengine's
    # config machinery and the task table behind the API.
    if name in ("load_encoder", "save_encoder", "read_metadata"):
        from mimbench import encoders

        return getattr(encoders, name)
    if name in ("evaluate", "pretrain"):
        from mimbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'mimbench' has no attribute {name!r}")
