"""``MAEStyleViT``: an mmseg backbone that runs a ViT-family encoder's own timm blocks, for the encoders mmseg's
``MAE`` backbone has no place for -- register tokens (DINOv2 with registers) or no class token (I-JEPA).

mmseg's ``MAE`` builds one class token with a position slot and no registers, so such encoders come here
(:func:`needs_token_backbone`). The module is built by :func:`mimbench.encoders.vit.build_vit` -- timm's
``VisionTransformer`` with the encoder's ``class_token`` / ``reg_tokens`` / ``no_embed_class`` / layer scale --
at the segmentation crop, and keeps its pieces under the names mmseg's layer-decay constructor numbers
(``get_layer_id_for_vit``, which it applies to every backbone whose class name contains "MAE"):
``cls_token``, ``pos_embed``, ``patch_embed.*`` -> layer 0, ``layers.i.*`` (timm's ``blocks.i``) -> layer
``i + 1``. ``reg_token`` is put in layer 0 with no weight decay by
:class:`~mimbench.seg.optim.MimLayerDecayOptimizerConstructor` (timm's ``group_matcher`` stem and
``no_weight_decay()``). The final norm is not built (``final_norm=False``, as the MAE segmentation protocol).

The tokens are formed as timm's ``VisionTransformer._pos_embed`` forms them (prefix tokens -- class token,
then registers -- joined before the position embedding is added, or after it with ``no_embed_class``); the
tapped blocks' outputs (``out_indices``) are returned as ``(B, D, h, w)`` maps of the patch tokens, the class
token and the registers dropped. Weights (:func:`vit_to_mae_style`): the encoder's tensors, ``blocks.`` ->
``layers.``, the position grid moved to the crop's grid by the encoder's ``pos_resample`` rule
(:func:`mimbench.encoders.vit.resample_vit_state`), loaded strictly by :meth:`MAEStyleViT.init_weights`
from the tensors-only checkpoint ``init_cfg=dict(type="Pretrained", checkpoint=...)`` names.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from mimbench.encoders.arch import parse_arch
from mimbench.encoders.families import family_flags
from mimbench.encoders.vit import build_vit, resample_vit_state, vit_shapes

#: The registered mmseg type name (contains "MAE": mmseg's layer-decay constructor then numbers its layers).
MAE_STYLE_VIT = "MAEStyleViT"


def needs_token_backbone(flags: Mapping) -> bool:
    """Whether a ViT-family encoder (parsed flags) has what mmseg's MAE backbone cannot hold: registers, no class
    token, no position slot for its class token, or DINOv2 giant's SwiGLU MLP."""
    return bool(flags.get("reg_tokens") or not flags.get("class_token", True) or flags.get("no_embed_class")
                or flags.get("swiglu_mlp"))


def token_fields(flags: Mapping) -> dict:
    """The backbone's ``tokens`` argument: the encoder's prefix-token layout and whether it has layer scale."""
    return dict(class_token=bool(flags.get("class_token", True)), reg_tokens=int(flags.get("reg_tokens") or 0),
                no_embed_class=bool(flags.get("no_embed_class", False)), layer_scale=bool(flags.get("init_values")),
                swiglu_mlp=bool(flags.get("swiglu_mlp")))


def _mmseg_name(key: str) -> str:
    return "layers." + key[len("blocks."):] if key.startswith("blocks.") else key


def mae_style_keys(meta: Mapping[str, str]) -> set[str]:
    """The parameter names of :class:`MAEStyleViT` for this encoder: its tensors (family shapes) without the
    final norm, ``blocks.`` -> ``layers.``."""
    _, flags = family_flags(meta, "encoder")
    return {_mmseg_name(k) for k in vit_shapes(parse_arch(meta, "encoder"), flags) if not k.startswith("norm.")}


def vit_to_mae_style(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                     grid: tuple[int, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """(``"MAEStyleViT"``, weights at the crop's patch ``grid``) of a ViT-family encoder (see the module docstring)."""
    _, flags = family_flags(meta, "encoder")
    stored = int(meta["img_size"]) // int(meta["patch_size"])
    state = resample_vit_state(dict(state_dict), stored, tuple(grid), flags)
    return MAE_STYLE_VIT, {_mmseg_name(k): v for k, v in state.items() if not k.startswith("norm.")}


@MODELS.register_module()
class MAEStyleViT(BaseModule):
    """The encoder's timm blocks as an mmseg backbone. Arguments as mmseg's ``MAE`` (so the segmentation configs
    only change ``type``), plus ``tokens`` (:func:`token_fields`). ``init_values`` is accepted and unused: whether
    there is layer scale follows the encoder (``tokens``), its values come from the encoder's weights. Only
    ``LN`` norms and the ``GELU`` activation (the ViT family's) are built."""

    def __init__(self, img_size=224, patch_size: int = 16, in_channels: int = 3, embed_dims: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_ratio: float = 4, out_indices: Sequence[int] | int = -1,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_cfg: dict | None = None,
                 act_cfg: dict | None = None, norm_eval: bool = False, init_values: float | None = None,
                 tokens: dict | None = None, init_cfg: dict | None = None):
        super().__init__(init_cfg=init_cfg)
        norm_cfg, act_cfg, tokens = norm_cfg or dict(type="LN", eps=1e-6), act_cfg or dict(type="GELU"), tokens or {}
        if norm_cfg.get("type") != "LN" or act_cfg.get("type") != "GELU":
            raise ValueError(f"{MAE_STYLE_VIT} builds LayerNorm and GELU only, not {norm_cfg} / {act_cfg}.")
        size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        arch = dict(patch_size=patch_size, embed_dim=embed_dims, depth=num_layers, num_heads=num_heads,
                    mlp_ratio=mlp_ratio)
        flags = dict(tokens, init_values=1.0 if tokens.get("layer_scale") else None)
        vit = build_vit(arch, flags, img_size=size, in_chans=in_channels, norm_eps=float(norm_cfg.get("eps", 1e-5)),
                        num_classes=0, global_pool="", attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        self.patch_embed, self.pos_embed, self.cls_token, self.reg_token = \
            vit.patch_embed, vit.pos_embed, vit.cls_token, vit.reg_token
        self.layers = nn.ModuleList(list(vit.blocks))
        self.num_prefix_tokens, self.no_embed_class = vit.num_prefix_tokens, vit.no_embed_class
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        self.out_indices = [i % num_layers for i in indices]
        self.norm_eval = norm_eval

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens -> the block input, as timm's ``VisionTransformer._pos_embed`` forms it."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            return torch.cat(prefix + [x + self.pos_embed], dim=1)
        return torch.cat(prefix + [x], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, _, h, w = x.shape
        p = self.patch_embed.patch_size
        grid = (h // p[0], w // p[1])
        x = self._tokens(self.patch_embed(x))
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(b, -1, *grid).contiguous())
        return tuple(outs)

    def init_weights(self) -> None:
        """With ``init_cfg=dict(type="Pretrained", checkpoint=PATH)``: the tensors-only checkpoint
        (``{"state_dict": weights}``, read weights-only) loaded strictly; else timm's initialisation stays."""
        cfg = self.init_cfg or {}
        if cfg.get("type") != "Pretrained":
            return super().init_weights()
        state = torch.load(cfg["checkpoint"], map_location="cpu", weights_only=True)
        self.load_state_dict(state.get("state_dict", state), strict=True)
        self._is_init = True

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eval()
        return self
