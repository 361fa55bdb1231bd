"""Layer-wise learning-rate decay for ViT backbones with the BEiT/MAE weight-decay exclusions.

mmseg 1.x's ``LearningRateDecayOptimizerConstructor`` (and its alias
``LayerDecayOptimizerConstructor``) exempts parameters from weight decay when
``name in ('pos_embed', 'cls_token')``, but the names it sees are
``backbone.pos_embed`` and ``backbone.cls_token``, so the test never matches;
the 2-D ``relative_position_bias_table`` parameters are not exempted at all.
The BEiT and MAE fine-tuning recipes apply no weight decay to any of them (nor
to biases and other 1-D parameters, which mmseg already handles).

:class:`MimLayerDecayOptimizerConstructor` keeps the library's layer ids and
learning-rate scales and only moves those parameters into weight-decay-0 groups
of the same layer. One exception: the register tokens (``reg_token``, of the
``MAEStyleViT`` backbone, :mod:`mimbench.seg.vit_backbone`), which the library's
``get_layer_id_for_vit`` does not know and puts in the top layer, go to layer 0
with weight decay 0, as timm's ``group_matcher`` and ``no_weight_decay()`` treat
them. It also accepts the ``layer_decay_rate`` key of the BEiT-style
configs without the library's deprecation warnings, and keeps the library's
per-parameter messages (which it prints to stdout) at DEBUG level.
"""

from __future__ import annotations

import contextlib
import io
import logging

from mmengine.logging import print_log
from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "relative_position_bias_table", "reg_token")
#: Parameters mmseg's ``get_layer_id_for_vit`` does not know (it puts them in the top layer) that belong to the stem,
#: layer 0, as timm's ``VisionTransformer.group_matcher`` places them: the register tokens of ``MAEStyleViT``.
STEM_NAMES = ("reg_token",)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MimLayerDecayOptimizerConstructor(LearningRateDecayOptimizerConstructor):
    """mmseg's layer-wise lr decay for ViTs, with no weight decay on position/token/bias-table parameters.

    ``paramwise_cfg``: ``num_layers`` and ``layer_decay_rate`` (or ``decay_rate``), as for
    mmseg's ``LayerDecayOptimizerConstructor``.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        if "layer_decay_rate" in paramwise_cfg:
            paramwise_cfg["decay_rate"] = paramwise_cfg.pop("layer_decay_rate")
        paramwise_cfg.setdefault("decay_type", "layer_wise_vit")
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: list[dict], module, **kwargs) -> None:
        groups: list[dict] = []
        # The library reports every parameter through print_log(logger=None), i.e. print().
        with contextlib.redirect_stdout(io.StringIO()) as library_messages:
            super().add_params(groups, module, **kwargs)
        print_log(library_messages.getvalue().rstrip(), logger="current", level=logging.DEBUG)

        by_name = {group["group_name"]: group for group in groups}
        for group in list(groups):
            last = [name.rsplit(".", 1)[-1] for name in group["param_names"]]
            stem = [i for i, n in enumerate(last) if n in STEM_NAMES and not group["group_name"].startswith("layer_0_")]
            if stem:
                self._move(group, stem, self._group(by_name, groups, "layer_0_no_decay", group), "layer 0 (stem)")
            if group["weight_decay"] == 0:
                continue
            last = [name.rsplit(".", 1)[-1] for name in group["param_names"]]
            moved = [i for i, n in enumerate(last) if n in NO_DECAY_NAMES]
            if moved:  # same layer, so same lr and lr_scale
                target = group["group_name"].removesuffix("_decay") + "_no_decay"
                self._move(group, moved, self._group(by_name, groups, target, group), "weight decay 0 (BEiT/MAE rule)")
        params.extend(group for group in groups if group["params"])

    def _group(self, by_name: dict, groups: list, name: str, like: dict) -> dict:
        """The group ``name`` (``layer_{id}_no_decay``), created with weight decay 0 and its layer's lr scale
        (mmseg's ``decay_rate ** (num_layers + 2 - id - 1)``) when the library made none."""
        if name not in by_name:
            layer = int(name.split("_")[1])
            scale = self.paramwise_cfg["decay_rate"] ** (self.paramwise_cfg["num_layers"] + 1 - layer)
            by_name[name] = dict(like, group_name=name, weight_decay=0.0, params=[], param_names=[],
                                 lr_scale=scale, lr=scale * self.base_lr)
            groups.append(by_name[name])
        return by_name[name]

    @staticmethod
    def _move(group: dict, indices: list[int], target: dict, why: str) -> None:
        print_log(f"{why} for {[group['param_names'][i] for i in indices]}", logger="current", level=logging.DEBUG)
        for key in ("params", "param_names"):
            target[key] += [group[key][i] for i in indices]
            group[key] = [v for i, v in enumerate(group[key]) if i not in indices]
