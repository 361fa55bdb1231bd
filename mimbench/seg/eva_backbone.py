"""The mmseg backbone of Eva-family encoders (DINOv3, EVA-02): timm ``Eva`` blocks under mmseg's ViT names.

``MAEStyleEva`` builds the encoder's timm ``Eva`` from the metadata (the ``eva`` field: the family's metadata
strings) and registers its parts under the names mmseg's MAE backbone uses, so that mmseg's layer-wise decay
numbers them as it numbers a ViT: ``cls_token``, ``pos_embed``, ``patch_embed.*`` -> layer 0, ``layers.i.*``
(timm's ``blocks.i``) -> i + 1 (``reg_token`` is moved to layer 0 by
:class:`mimbench.seg.optim.MimLayerDecayOptimizerConstructor`; mmseg's constructor picks its ViT numbering by
a class name containing "MAE", hence the name). The final norm is not part of the backbone (as mmseg's MAE
with ``final_norm=False``, the MAE segmentation protocol). Each output is the patch tokens of a tapped block
as a feature map (class and register tokens dropped); the rotary grid is computed at the input's patch grid
and an absolute ``pos_embed`` arrives resampled to the crop's grid (:func:`mimbench.seg.backbone.eva_to_mmseg`).
"""
from __future__ import annotations

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from mimbench.encoders.eva import build_eva, parse_eva_flags


@MODELS.register_module()
class MAEStyleEva(BaseModule):
    """timm ``Eva`` blocks as an mmseg backbone (see the module docstring).

    Args:
        eva: the encoder's Eva metadata fields (strings, :data:`mimbench.encoders.eva.EVA_FIELDS`).
        img_size, patch_size, embed_dims, num_layers, num_heads, mlp_ratio, norm_cfg: the encoder's
            architecture, as the segmentation config carries it for mmseg's MAE backbone.
        out_indices: blocks whose outputs are returned.
        drop_path_rate, attn_drop_rate: as for mmseg's MAE backbone.
        act_cfg, norm_eval, init_values: accepted for config compatibility with mmseg's MAE backbone and
            unused: activation and layer scale are the encoder's own.
    """

    def __init__(self, *, eva: dict, img_size, patch_size: int, embed_dims: int, num_layers: int, num_heads: int,
                 mlp_ratio: float, out_indices, norm_cfg: dict, in_channels: int = 3, drop_path_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, act_cfg=None, norm_eval: bool = False, init_values=None,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        size = img_size if isinstance(img_size, int) else tuple(img_size)
        arch = dict(patch_size=patch_size, embed_dim=embed_dims, depth=num_layers, num_heads=num_heads,
                    mlp_ratio=mlp_ratio)
        model = build_eva(arch, parse_eva_flags(eva, "segmentation backbone"), img_size=size, in_chans=in_channels,
                          norm_eps=float(norm_cfg.get("eps", 1e-6)), num_classes=0, global_pool="",
                          drop_path_rate=drop_path_rate, attn_drop_rate=attn_drop_rate, dynamic_img_size=True)
        self._eva = [model]  # the timm model runs the forward; its parts are registered below under mmseg's names
        self.cls_token, self.patch_embed, self.layers, self.rope = model.cls_token, model.patch_embed, model.blocks, \
            model.rope
        if model.reg_token is not None:
            self.reg_token = model.reg_token
        if model.pos_embed is not None:
            self.pos_embed = model.pos_embed
        self.out_indices = [int(i) for i in out_indices]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self._eva[0]
        model.train(self.training)
        return tuple(model.forward_intermediates(x, indices=self.out_indices, output_fmt="NCHW",
                                                 intermediates_only=True))
