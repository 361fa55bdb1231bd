"""Registry of pre-training models: ``create_model(name, **kwargs)`` and ``model_spec(cfg)``.

Model modules register builders with ``@register("name", technique=..., model_cls=...)``;
:mod:`pretrain.models` imports every model module, and importing :mod:`pretrain` imports it, so the
table is complete whenever anything of the package is used. Every built model is checked against
:class:`pretrain.contract.PretrainModel`.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

from torch import nn

from mimbench.errors import MimbenchError
from pretrain.contract import check_model


class ModelEntry(NamedTuple):
    """One registered model: its builder, the technique its files record by default, and its class."""

    builder: Callable[..., nn.Module]
    technique: str
    model_cls: type


class ModelSpec(NamedTuple):
    """What a pre-training config builds (:func:`model_spec`), known before the model is built."""

    name: str  # registry name
    kwargs: dict  # constructor arguments
    family: str  # family of the exported file: "vit", "beit" (encoders) or "vqkd" (a tokenizer)
    technique: str  # recorded in the exported file
    exports: str  # "encoder" or "tokenizer"
    export_name: str  # file name in the run folder


_MODELS: dict[str, ModelEntry] = {}


def register(name: str, *, technique: str, model_cls: type) -> Callable[[Callable[..., nn.Module]], Callable]:
    """Decorator registering a model builder under ``name``; ``technique`` is the default technique of
    its files, ``model_cls`` the class it builds (read for the spec and the accepted arguments)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name].builder is not fn:
            raise ValueError(f"model name {name!r} registered twice")
        _MODELS[name] = ModelEntry(fn, technique, model_cls)
        return fn

    return deco


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise MimbenchError(f"Unknown pre-training model {name!r}.", f"Known models: {', '.join(sorted(_MODELS))}.")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Unknown names, unknown/invalid arguments and a model that breaks the contract raise :class:`MimbenchError`.
    """
    entry = _entry(name)
    try:
        model = entry.builder(**kwargs)
    except TypeError as e:
        if "keyword argument" not in str(e):
            raise
        raise MimbenchError(f"Model {name!r} does not accept these arguments ({e}).",
                            f"{name} accepts: {', '.join(accepted_arguments(entry.model_cls))}.") from e
    return check_model(model, name)


def accepted_arguments(cls: type) -> list[str]:
    """Constructor argument names of ``cls`` and of the bases its ``*args, **kwargs`` pass on to."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def model_spec(cfg) -> ModelSpec:
    """What the pre-training config ``cfg`` builds: ``cfg.model.name`` with the other ``model`` keys as
    arguments; the technique is ``cfg.technique``, or the registered one when the config leaves it None."""
    kwargs = dict(cfg.model)
    name = kwargs.pop("name")
    entry = _entry(name)
    cls = entry.model_cls
    return ModelSpec(name=name, kwargs=kwargs, family=cls.encoder_family, technique=cfg.technique or entry.technique,
                     exports=cls.exports, export_name=cls.export_name)
