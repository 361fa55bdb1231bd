"""Registry of pre-training models: ``create_model(name, **kwargs)``.

Model modules register builders with ``@register("name")``; every module of
:mod:`pretrain.models` is imported on first use, so a new model family only needs its file.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable

from torch import nn

from mimbench.errors import MimbenchError

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_discovered = False


def register(name: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name`` (default: the function's name)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _BUILDERS and _BUILDERS[key] is not fn:
            raise ValueError(f"model name {key!r} registered twice")
        _BUILDERS[key] = fn
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import pretrain.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _discovered = True


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    _discover()
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Unknown names and unknown/invalid arguments raise :class:`MimbenchError`.
    """
    _discover()
    if name not in _BUILDERS:
        raise MimbenchError(
            f"Unknown pre-training model {name!r}.", f"Known models: {', '.join(sorted(_BUILDERS))}."
        )
    try:
        return _BUILDERS[name](**kwargs)
    except TypeError as e:
        if "keyword argument" not in str(e):
            raise
        raise MimbenchError(
            f"Model {name!r} does not accept these arguments ({e}).",
            _accepted_hint(name),
        ) from e


def _accepted_hint(name: str) -> str:
    from pretrain.models.mae import MaskedAutoencoderViT

    params = [p for p in inspect.signature(MaskedAutoencoderViT.__init__).parameters if p != "self"]
    return f"The MAE family accepts: {', '.join(params)}." if "mae" in name else "Check the model's docstring."
