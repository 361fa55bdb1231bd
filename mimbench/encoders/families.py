"""The encoder families: one table saying, per family, everything the rest of mimbench needs to know.

An encoder file's ``family`` metadata field names its entry in :data:`FAMILY_TABLE` (absent = "vit",
as in files older than the field). Every place that treats families differently goes through the
entry: the file format checks tensors with ``shapes``, :func:`mimbench.encoders.load_encoder` builds
and resamples with ``build`` / ``resample``, fine-tuning groups parameters with ``layer_decay_groups``,
segmentation converts weights with the function ``mmseg_backbone`` names.

The families: ``vit`` (timm ``VisionTransformer``), ``beit`` (timm ``Beit``) and ``eva`` (timm ``Eva``:
DINOv3, EVA-02). Adding a family is one module plus one entry here. The module
(like :mod:`mimbench.encoders.beit`) documents the state-dict layout of its encoder files and provides,
each with the signature given:

* ``parse(meta, where) -> flags``: the family's own metadata fields (those every file of it carries
  listed in ``fields``; optional ones, such as the ViT family's :data:`~mimbench.encoders.vit.VIT_FIELDS`,
  documented by the module), checked and turned into Python values; raise
  :class:`~mimbench.errors.MimbenchError` on a bad value;
* ``shapes(arch, flags, in_chans) -> {tensor name: shape}``: the exact tensors of an encoder file,
  ``arch`` being :func:`mimbench.encoders.arch.parse_arch`'s dict;
* ``build(arch, flags, *, img_size, in_chans, norm_eps, **timm_kwargs) -> model``: the timm model
  (an instance of ``timm_class``) with the file's architecture at ``img_size``;
* ``resample(state, old_grid, new_grid, flags=None) -> state``: position information moved from the
  stored square grid to the model's grid, with :mod:`mimbench.encoders.resample` (``flags``: the
  parsed family fields, e.g. the ViT family's ``pos_resample`` variant).

The entry then names ``timm_class``, ``fields``, the ``layer_decay_groups`` function (usually
:func:`timm_layer_decay_groups`, valid for every timm model whose ``group_matcher`` numbers its
blocks), ``mmseg_backbone`` (the name of a function ``fn(state, meta, grid) -> (mmseg backbone type,
weights)`` in :mod:`mimbench.seg.backbone`, or None when segmentation does not support the family)
and ``global_pool`` (the pooling :func:`~mimbench.encoders.load_encoder` uses unless told otherwise; a
``global_pool`` in the parsed flags -- the ViT family's metadata field -- takes precedence, see
:func:`default_pool`).
Converters of checkpoints of that family are layouts in :mod:`mimbench.encoders.convert`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from mimbench.encoders.beit import BEIT_FIELDS, beit_shapes, build_beit, parse_beit_flags, resample_beit_state
from mimbench.encoders.eva import (
    EVA_FIELDS, build_eva, eva_global_pool, eva_shapes, eva_task_pool, parse_eva_flags, resample_eva_state,
)
from mimbench.encoders.vit import build_vit, parse_vit_fields, resample_vit_state, vit_shapes
from mimbench.errors import MimbenchError


def timm_layer_decay_groups(model: torch.nn.Module, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's ``param_groups_layer_decay``: layer ids from the model's ``group_matcher`` (stem -> 0, block i ->
    i + 1, final norm / head -> depth + 1; ``lr_scale`` = decay ** (depth + 1 - layer)), no weight decay for
    1-D parameters and the model's ``no_weight_decay()`` names."""
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


@dataclass(frozen=True)
class Family:
    """One encoder family (see the module docstring for what each field must provide)."""

    name: str
    timm_class: type
    fields: tuple[str, ...]
    parse: Callable[[Mapping[str, str], str], dict]
    shapes: Callable[..., dict]
    build: Callable[..., torch.nn.Module]
    resample: Callable[..., dict]
    layer_decay_groups: Callable[..., list]
    mmseg_backbone: str | None
    global_pool: str = "token"
    #: ``fn(flags) -> global_pool`` when the default pooling depends on the file (it then replaces ``global_pool``)
    pool_of: Callable[[Mapping], str] | None = None
    #: ``fn(flags, task) -> pooling or None``: the evaluation pooling (:data:`mimbench.schema.POOLS` names: "cls",
    #: "avg", "cls+avg") the family's authors use for ``task`` ("knn", "linear"), None where the default holds
    task_pool: Callable[[Mapping, str], str | None] | None = None

    def default_pool(self, flags: Mapping) -> str:
        """The timm ``global_pool`` a loaded encoder of this family gets unless told otherwise: the file's
        ``global_pool`` field (ViT family), else ``pool_of(flags)``, else the family's ``global_pool``."""
        return flags.get("global_pool") or (self.pool_of(flags) if self.pool_of else self.global_pool)


FAMILY_TABLE: dict[str, Family] = {
    "vit": Family(name="vit", timm_class=VisionTransformer, fields=(), parse=parse_vit_fields, shapes=vit_shapes,
                  build=build_vit, resample=resample_vit_state, layer_decay_groups=timm_layer_decay_groups,
                  mmseg_backbone="vit_family_to_mmseg"),
    "beit": Family(name="beit", timm_class=Beit, fields=BEIT_FIELDS, parse=parse_beit_flags, shapes=beit_shapes,
                   build=build_beit, resample=resample_beit_state, layer_decay_groups=timm_layer_decay_groups,
                   mmseg_backbone="beit_encoder_to_mmseg"),
    "eva": Family(name="eva", timm_class=Eva, fields=EVA_FIELDS, parse=parse_eva_flags, shapes=eva_shapes,
                  build=build_eva, resample=resample_eva_state, layer_decay_groups=timm_layer_decay_groups,
                  mmseg_backbone="eva_to_mmseg", pool_of=eva_global_pool,
                  task_pool=eva_task_pool),
}

#: Encoder family names, as the ``family`` metadata field writes them.
FAMILIES = tuple(FAMILY_TABLE)


def encoder_family(meta: Mapping[str, str]) -> str:
    """The ``family`` field of an encoder's metadata ("vit" when absent, as in files older than the field)."""
    return meta.get("family", "vit")


def family_of(meta: Mapping[str, str], where: str = "encoder file") -> Family:
    """The table entry of the encoder's family; MimbenchError for a family this version does not know."""
    family = encoder_family(meta)
    if family not in FAMILY_TABLE:
        raise MimbenchError(f"{where}: unknown encoder family {family!r}.",
                            f"This version of mimbench reads {', '.join(FAMILIES)}; update mimbench or re-export.")
    return FAMILY_TABLE[family]


def family_of_model(model: torch.nn.Module) -> Family:
    """The entry whose timm class ``model`` is (a loaded encoder, or a timm model built directly)."""
    for family in FAMILY_TABLE.values():
        if isinstance(model, family.timm_class):
            return family
    raise MimbenchError(f"A {type(model).__name__} is not a model of any encoder family.",
                        f"Use a model of one of {', '.join(f.timm_class.__name__ for f in FAMILY_TABLE.values())} "
                        "(load_encoder builds them).")


def family_flags(meta: Mapping[str, str], where: str = "encoder file") -> tuple[Family, dict]:
    """``(entry, parsed family fields)`` of an encoder's metadata, both checked."""
    family = family_of(meta, where)
    return family, family.parse(meta, where)


def default_pool(meta: Mapping[str, str], where: str = "encoder file") -> str:
    """The timm ``global_pool`` the encoder's authors evaluate it with (:meth:`Family.default_pool`): the
    metadata's ``global_pool`` field when the family has one and it is set, else the family's default ("token":
    the class token; Eva files with a pooled final norm: "avg")."""
    family, flags = family_flags(meta, where)
    return family.default_pool(flags)


def family_pool(meta: Mapping[str, str], task: str | None = None, where: str = "encoder file") -> str:
    """The evaluation pooling (:data:`mimbench.schema.POOLS` name) the encoder's authors read ``task`` with: the
    family's ``task_pool`` for it (Eva: DINOv3 k-NN "cls", linear "cls+avg"; EVA-02 "avg"), else "avg" when
    :func:`default_pool` is "avg" (no class token, ``global_pool=avg``), else "cls"."""
    family, flags = family_flags(meta, where)
    chosen = family.task_pool(flags, task) if family.task_pool and task else None
    return chosen or ("avg" if family.default_pool(flags) == "avg" else "cls")


def has_class_token(meta: Mapping[str, str], where: str = "encoder file") -> bool:
    """Whether the encoder has a class token (every family does, except ViT-family files that say
    ``class_token=false``)."""
    return bool(family_flags(meta, where)[1].get("class_token", True))


def pooled_final_norm(meta: Mapping[str, str], where: str = "encoder file") -> bool:
    """Whether the encoder's final norm acts on pooled features (Eva files with ``final_norm=pooled``, EVA-02 as
    timm ships it) instead of on every token."""
    return family_flags(meta, where)[1].get("final_norm") == "pooled"


def tensor_shapes(meta: Mapping[str, str], arch: Mapping[str, float], in_chans: int = 3,
                  where: str = "encoder file") -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape an encoder with this metadata holds (``arch``: its parsed architecture)."""
    family, flags = family_flags(meta, where)
    return family.shapes(arch, flags, in_chans)
