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
of the same layer. It also accepts the ``layer_decay_rate`` key of the BEiT-style
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
#: Token parameters mmseg's ViT numbering does not know: they belong to the embeddings (layer 0), as in timm's
#: ``group_matcher`` (register tokens of the Eva family's backbone, :mod:`mimbench.seg.eva_backbone`).
LAYER0_NAMES = ("backbone.reg_token",)


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
            if group["weight_decay"] == 0:
                continue
            moved = [i for i, name in enumerate(group["param_names"]) if name.rsplit(".", 1)[-1] in NO_DECAY_NAMES]
            if not moved:
                continue
            target_name = group["group_name"].removesuffix("_decay") + "_no_decay"
            if target_name not in by_name:  # same layer, so same lr and lr_scale
                by_name[target_name] = dict(group, group_name=target_name, weight_decay=0.0, params=[], param_names=[])
                groups.append(by_name[target_name])
            names = [group["param_names"][i] for i in moved]
            print_log(f"weight decay 0 (BEiT/MAE rule) for {names}", logger="current", level=logging.DEBUG)
            for key in ("params", "param_names"):
                by_name[target_name][key] += [group[key][i] for i in moved]
                group[key] = [v for i, v in enumerate(group[key]) if i not in moved]
        self._tokens_to_layer0(groups, by_name)
        params.extend(group for group in groups if group["params"])

    def _tokens_to_layer0(self, groups: list[dict], by_name: dict) -> None:
        """Move :data:`LAYER0_NAMES` (no weight decay) into layer 0, which mmseg's numbering gives the top id."""
        num_layers = self.paramwise_cfg["num_layers"] + 2
        scale = self.paramwise_cfg["decay_rate"] ** (num_layers - 1)
        for group in list(groups):
            moved = [i for i, name in enumerate(group["param_names"]) if name in LAYER0_NAMES]
            if not moved or group["group_name"] == "layer_0_no_decay":
                continue
            if "layer_0_no_decay" not in by_name:
                by_name["layer_0_no_decay"] = dict(group_name="layer_0_no_decay", weight_decay=0.0, params=[],
                                                   param_names=[], lr_scale=scale, lr=scale * self.base_lr)
                groups.append(by_name["layer_0_no_decay"])
            for key in ("params", "param_names"):
                by_name["layer_0_no_decay"][key] += [group[key][i] for i in moved]
                group[key] = [v for i, v in enumerate(group[key]) if i not in moved]
