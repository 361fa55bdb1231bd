"""mimbench: standardized evaluations of masked-image-modelling ViT encoders."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder", "save_encoder"]


def __getattr__(name: str):
    # Lazy so that `import mimbench` (and the CLI's --help) does not pay for torch/timm.
    if name in ("load_encoder", "save_encoder", "read_metadata"):
        from mimbench import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module 'mimbench' has no attribute {name!r}")
