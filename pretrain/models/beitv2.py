"""BEiT v2-style masked image modelling and its DDS plug-in ``beitv2+dds``.

``BEiTv2`` (registered ``"beitv2"`` and ``"beitv2_<preset>"``)
    The encoder is a timm ``Beit`` (``global_pool="token"``: per-token final ``norm``, no head),
    so its ``state_dict()`` *is* the exported encoder (BEiT-family encoder file). Per step:
    BEiT block-wise masks (:mod:`pretrain.block_masking`; BEiT v2: 75 of 196 patches, blocks of at
    least 16, aspect 0.3..1/0.3), the patch embeddings of masked patches replaced by a learnable
    ``mask_token`` (before the class token is prepended and position information is added),
    the blocks with shared (``use_shared_rel_pos_bias``, default) or per-block relative position
    bias and layer scale (``layer_scale_init_value``, BEiT v2 base: 0.1), the final norm, and a
    linear ``lm_head`` over the tokenizer's vocabulary; loss = cross-entropy with the tokenizer's
    ids of the *masked* patches only, averaged over all masked patches of the batch (the official
    ``CrossEntropyLoss`` on ``outputs[bool_masked_pos]``).

    The optional class-token pre-training head of BEiT v2 (``cls_pt=True``, off by default):
    ``cls_pt_head_layers`` extra blocks take the final class token concatenated with the patch
    tokens after block ``cls_pt_early_layers`` and predict the same masked tokens through the
    shared norm and ``lm_head`` (``cls_pt_shared_lm_head=True``, official default) or their own;
    its cross-entropy is added with weight 1. These blocks are pre-training only (not exported).

    The tokenizer (``tokenizer=<file>``: a ``tokenizer.safetensors`` of this project or the
    official VQ-KD ``.pth``) is a frozen sub-module in eval mode; its ids are computed from the
    same augmented image the encoder sees (the official code feeds a second, identically cropped
    view; with one crop per image here they coincide except for colour jitter, which this
    pipeline does not apply). The vocabulary size comes from the tokenizer.

``BEiTv2WithDDS`` (registered ``"beitv2+dds"``)
    Deep dynamic supervision on the token-prediction loss: the outputs of the intermediate blocks
    ``dds_depths`` go through the encoder's final norm and the shared ``lm_head`` (no new
    parameters), each depth's per-patch cross-entropy is weighted by the dynamic weights of the
    distance map of its block mask with that depth's beta, and the depths are summed with
    ``dds_weights`` - by the same :func:`pretrain.dds.deep_dynamic_supervision` that MAE+DDS
    uses, with the same knobs and defaults (docs/techniques.md). With ``dds_depths=(depth,)``,
    ``dds_beta_mode="fixed"``, ``dds_beta_start=0`` it is BEiT v2's loss exactly.

Forward contract (as the MAE family): ``forward(imgs, mask_ratio=None, mask=None) -> (loss,
logits, mask)``: ``logits`` ``N x L x vocab`` from the last layer, ``mask`` ``N x L`` float
(1 = masked). ``mask`` (bool/float ``N x L``) fixes the mask; ``mask_ratio`` (if given) overrides
``num_mask_patches`` with ``round(mask_ratio * L)``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.beit import Beit, Block
from torch import nn

from mimbench.errors import MimbenchError
from pretrain import dds
from pretrain.block_masking import BlockMaskGenerator
from pretrain.contract import StepContract, VisualTokenizer
from pretrain.registry import register
from pretrain.tokenizer import load_tokenizer

PRESETS = {
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4),
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}


class BEiTv2(StepContract, nn.Module):
    """BEiT v2 masked image modelling; see the module docstring.

    Args:
        tokenizer: tokenizer file, or a :class:`pretrain.contract.VisualTokenizer` instance.
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the encoder.
        drop_path_rate: stochastic depth (BEiT v2 base: 0 for 300 epochs, 0.1 for 1600).
        layer_scale_init_value: layer scale init (0 = no layer scale).
        use_abs_pos_emb, use_rel_pos_bias, use_shared_rel_pos_bias: position information
            (BEiT v2: shared relative bias only).
        num_mask_patches, min_mask_patches_per_block, max_mask_patches_per_block, mask_min_aspect,
            mask_max_aspect: :class:`pretrain.block_masking.BlockMaskGenerator`.
        cls_pt, cls_pt_early_layers, cls_pt_head_layers, cls_pt_shared_lm_head: the class-token head.
        init_std: std of the truncated-normal init of Linear layers, tokens and position embedding.
        tokenizer_num_heads: head count for an official tokenizer checkpoint (default 64-dim heads).
    """

    # pretrain.contract.PretrainModel: block masks in (draw_mask), a BEiT-family encoder file out (export:
    # StepContract's, with encoder_family_metadata's fields).
    mask_input = "blocks"
    exports = "encoder"
    encoder_family = "beit"

    def __init__(self, tokenizer, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 0.1, use_abs_pos_emb: bool = False,
                 use_rel_pos_bias: bool = False, use_shared_rel_pos_bias: bool = True, num_mask_patches: int = 75,
                 min_mask_patches_per_block: int = 16, max_mask_patches_per_block: int | None = None,
                 mask_min_aspect: float = 0.3, mask_max_aspect: float | None = None, cls_pt: bool = False,
                 cls_pt_early_layers: int = 9, cls_pt_head_layers: int = 2, cls_pt_shared_lm_head: bool = True,
                 init_std: float = 0.02, tokenizer_num_heads: int | None = None) -> None:
        super().__init__()
        if use_rel_pos_bias and use_shared_rel_pos_bias:
            raise MimbenchError("use_rel_pos_bias and use_shared_rel_pos_bias are exclusive.",
                                "BEiT v2 uses the shared bias (use_shared_rel_pos_bias=True).")
        if img_size % patch_size:
            raise MimbenchError(f"img_size {img_size} is not a multiple of patch_size {patch_size}.")
        self.tokenizer = self._build_tokenizer(tokenizer, tokenizer_num_heads)
        grid = img_size // patch_size
        if tuple(self.tokenizer.grid_size) != (grid, grid):
            raise MimbenchError(
                f"The tokenizer gives a {self.tokenizer.grid_size[0]}x{self.tokenizer.grid_size[1]} token grid, "
                f"the encoder has {grid}x{grid} patches.",
                "Use a tokenizer trained at the encoder's image and patch size (one token per patch).")
        self.img_size, self.patch_size, self.in_chans = int(img_size), int(patch_size), int(in_chans)
        self.embed_dim, self.depth, self.num_heads, self.mlp_ratio = int(embed_dim), int(depth), int(num_heads), float(mlp_ratio)
        self.layer_scale_init_value = float(layer_scale_init_value)
        self.use_abs_pos_emb, self.use_rel_pos_bias = bool(use_abs_pos_emb), bool(use_rel_pos_bias)
        self.use_shared_rel_pos_bias = bool(use_shared_rel_pos_bias)
        self.vocab_size = int(self.tokenizer.num_tokens)
        self.mask_generator = BlockMaskGenerator(grid, num_mask_patches, min_mask_patches_per_block,
                                                 max_mask_patches_per_block, mask_min_aspect, mask_max_aspect)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.encoder = Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                            global_pool="token", use_fc_norm=False, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                            norm_layer=norm_layer, init_values=self.layer_scale_init_value or None,
                            use_abs_pos_emb=use_abs_pos_emb, use_rel_pos_bias=use_rel_pos_bias,
                            use_shared_rel_pos_bias=use_shared_rel_pos_bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, self.vocab_size)
        self.cls_pt = bool(cls_pt)
        self.cls_pt_early_layers = int(cls_pt_early_layers)
        self.cls_pt_shared_lm_head = bool(cls_pt_shared_lm_head)
        if self.cls_pt:
            if not 1 <= self.cls_pt_early_layers <= depth or int(cls_pt_head_layers) < 1:
                raise MimbenchError(
                    f"cls_pt_early_layers={cls_pt_early_layers} must be in 1..depth={depth} and "
                    f"cls_pt_head_layers={cls_pt_head_layers} >= 1.")
            n_dpr = max(depth, self.cls_pt_early_layers + int(cls_pt_head_layers))
            dpr = torch.linspace(0, drop_path_rate, n_dpr, device="cpu").tolist()
            window = (grid, grid) if use_rel_pos_bias else None
            self.cls_pt_layers = nn.ModuleList([
                Block(dim=embed_dim, num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio, drop_path=dpr[i],
                      init_values=self.layer_scale_init_value or None, norm_layer=norm_layer, window_size=window)
                for i in range(self.cls_pt_early_layers, self.cls_pt_early_layers + int(cls_pt_head_layers))])
            if not self.cls_pt_shared_lm_head:
                self.cls_pt_norm = norm_layer(embed_dim)
                self.cls_pt_lm_head = nn.Linear(embed_dim, self.vocab_size)
        self._init_weights(init_std)
        self._loss_terms: dict[str, torch.Tensor] = {}

    @staticmethod
    def _build_tokenizer(tokenizer, num_heads):
        if isinstance(tokenizer, VisualTokenizer):
            tok = tokenizer
        elif tokenizer is None or tokenizer == "":
            raise MimbenchError("BEiT v2 pre-training needs a tokenizer (model.tokenizer).",
                                "Train one with `mimbench pretrain pretrain/configs/vqkd_tiny_fmnist.py` or give the "
                                "official VQ-KD checkpoint file.")
        else:
            kw = {"num_heads": num_heads} if num_heads else {}
            tok = load_tokenizer(tokenizer, **kw)
        tok.requires_grad_(False)
        return tok.eval()

    def _init_weights(self, std: float) -> None:
        # BEiT: truncated normal (std 0.02) on tokens, position embedding and every Linear; LayerNorm
        # 1/0; attention/MLP output projections divided by sqrt(2 * layer id). timm's Beit has done
        # that for the encoder; the same here for what this class adds.
        nn.init.trunc_normal_(self.mask_token, std=std)
        nn.init.trunc_normal_(self.encoder.cls_token, std=std)
        nn.init.trunc_normal_(self.lm_head.weight, std=std)
        nn.init.zeros_(self.lm_head.bias)
        if self.cls_pt:
            for m in self.cls_pt_layers.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            with torch.no_grad():
                for i, blk in enumerate(self.cls_pt_layers):
                    scale = (2.0 * (self.cls_pt_early_layers + i + 1)) ** 0.5
                    blk.attn.proj.weight.div_(scale)
                    blk.mlp.fc2.weight.div_(scale)
            if not self.cls_pt_shared_lm_head:
                nn.init.trunc_normal_(self.cls_pt_lm_head.weight, std=std)
                nn.init.zeros_(self.cls_pt_lm_head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode (no codebook updates)
        return self

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    # ------------------------------------------------------------------ pieces
    def draw_mask(self, n: int, mask_ratio: float | None = None, device=None, generators=None) -> torch.Tensor:
        """``n x L`` bool block masks: from ``generators`` (one ``torch.Generator`` per mask) if given, else
        from the global torch RNG."""
        gen = self.mask_generator
        if mask_ratio is not None:
            gen = BlockMaskGenerator(gen.height, int(round(float(mask_ratio) * self.num_patches)), gen.min_num_patches,
                                     None, math.exp(gen.log_aspect[0]), math.exp(gen.log_aspect[1]))
        return gen.batch(n, generators, device=device)

    def forward_features(self, imgs: torch.Tensor, mask: torch.Tensor, return_layers: Sequence[int] = ()):
        """Encoder with mask tokens: ``(x, x_cls_pt, feats)``.

        ``x`` ``N x (1+L) x D`` after the last block (before the final norm), ``x_cls_pt`` the
        class-token head's output (or ``None``), ``feats`` the outputs after the block counts
        ``return_layers`` (same shape, before the norm)."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        x = enc.pos_drop(x)
        rel = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        feats, early = [], None
        for i, blk in enumerate(enc.blocks):
            x = blk(x, shared_rel_pos_bias=rel)
            if i + 1 in return_layers:
                feats.append(x)
            if self.cls_pt and i + 1 == self.cls_pt_early_layers:
                early = x[:, 1:]
        x_cls = None
        if self.cls_pt:
            x_cls = torch.cat([x[:, :1], early], dim=1)
            for blk in self.cls_pt_layers:
                x_cls = blk(x_cls, shared_rel_pos_bias=rel)
        return x, x_cls, feats

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits ``N x L x vocab`` from block outputs ``N x (1+L) x D``: final norm + lm_head."""
        return self.lm_head(self.encoder.norm(x)[:, 1:])

    def _cls_pt_logits(self, x_cls: torch.Tensor) -> torch.Tensor:
        if self.cls_pt_shared_lm_head:
            return self._logits(x_cls)
        return self.cls_pt_lm_head(self.cls_pt_norm(x_cls)[:, 1:])

    def _prepare(self, imgs, mask_ratio, mask):
        n = imgs.shape[0]
        if mask is None:
            mask = self.draw_mask(n, mask_ratio, device=imgs.device)
        else:
            if tuple(mask.shape) != (n, self.num_patches):
                raise MimbenchError(f"mask must be N x L = ({n}, {self.num_patches}), got {tuple(mask.shape)}.")
            mask = mask.to(imgs.device) > 0.5 if mask.is_floating_point() else mask.to(imgs.device).bool()
        with torch.no_grad():
            labels = self.tokenizer.tokenize(imgs)
        return mask, labels

    @staticmethod
    def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-patch cross-entropy ``N x L`` (float32)."""
        return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: torch.Tensor | None = None):
        mask, labels = self._prepare(imgs, mask_ratio, mask)
        x, x_cls, _ = self.forward_features(imgs, mask)
        logits = self._logits(x)
        # The official loss: cross-entropy over the masked patches of the whole batch.
        loss_mim = F.cross_entropy(logits[mask].float(), labels[mask])
        terms = {"loss_mim": loss_mim.detach(),
                 "mlm_acc": (logits[mask].argmax(-1) == labels[mask]).float().mean().detach()}
        total = loss_mim
        if self.cls_pt:
            cls_logits = self._cls_pt_logits(x_cls)
            loss_cls = F.cross_entropy(cls_logits[mask].float(), labels[mask])
            terms["loss_cls_pt"] = loss_cls.detach()
            total = total + loss_cls
        self._loss_terms = terms
        return total, logits, mask.float()

    # ------------------------------------------------------------------ contract (the rest: StepContract)
    def no_weight_decay(self) -> set[str]:
        # The official BEiT v2 skip list ({pos_embed, cls_token}; 1-D tensors and biases are excluded by
        # the optimizer anyway): the mask token and the relative position bias tables are decayed there too.
        return {"encoder.cls_token", "encoder.pos_embed"}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm ``Beit`` (token pooling, no head) state dict: the BEiT-family encoder file's tensors."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def encoder_arch(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)

    def encoder_family_metadata(self) -> dict[str, str]:
        """The BEiT-family fields of the encoder file (strings, as safetensors metadata)."""
        return {"use_abs_pos_emb": str(self.use_abs_pos_emb).lower(),
                "use_rel_pos_bias": str(self.use_rel_pos_bias).lower(),
                "use_shared_rel_pos_bias": str(self.use_shared_rel_pos_bias).lower(),
                "layer_scale_init_value": repr(self.layer_scale_init_value)}


class BEiTv2WithDDS(dds.DDSBetaSchedule, BEiTv2):
    """BEiT v2 with deep dynamic supervision on the token-prediction loss (module docstring).

    Args (besides :class:`BEiTv2`'s, keyword-only): ``dds_depths``, ``dds_weights``,
    ``dds_beta_mode``, ``dds_beta_start``, ``dds_beta_end``, ``dds_beta_schedule``,
    ``dds_beta_bound``, ``dds_beta_reg``, ``dds_distance_metric``, ``dds_distance_norm`` - the
    MAE+DDS knobs with the same meanings and defaults. The intermediate depths use the encoder's
    final norm and ``lm_head`` (``dds_norm="shared"``; a separate norm is not offered here).
    """

    def __init__(self, *args, dds_depths: Sequence[int] | None = None, dds_weights: Sequence[float] | None = None,
                 dds_beta_mode: str = "learnable", dds_beta_start: float = -1.0, dds_beta_end: float = 1.0,
                 dds_beta_schedule: str = "cosine", dds_beta_bound: float = 0.5, dds_beta_reg: float = 0.0,
                 dds_distance_metric: str = "euclidean", dds_distance_norm: str = "max", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dds_depths, self.dds_weights = dds.check_dds_args(
            self.depth, dds_depths, dds_weights, dds_distance_metric, dds_distance_norm, dds_beta_reg)
        self.dds_beta_reg = float(dds_beta_reg)
        self.dds_distance_metric, self.dds_distance_norm = dds_distance_metric, dds_distance_norm
        self.dds_beta = dds.DynamicBeta(len(self.dds_depths), mode=dds_beta_mode, beta_start=dds_beta_start,
                                      beta_end=dds_beta_end, schedule=dds_beta_schedule, bound=dds_beta_bound,
                                      persistent_progress=True)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: torch.Tensor | None = None):
        mask, labels = self._prepare(imgs, mask_ratio, mask)
        inter = [d for d in self.dds_depths if d < self.depth]
        x, x_cls, feats = self.forward_features(imgs, mask, inter)
        logits = self._logits(x)
        per_patch = [self.token_ce(self._logits(f), labels) for f in feats] + [self.token_ce(logits, labels)]
        maskf = mask.float()
        betas = self.dds_beta()
        # Block masks keep visible patches by construction (num_mask_patches < L).
        objective = dds.deep_dynamic_supervision(per_patch, maskf, self.grid_size, betas, self.dds_weights,
                                         self.dds_distance_metric, self.dds_distance_norm)
        total = objective.total
        terms: dict[str, torch.Tensor] = {
            "loss_mim": dds.weighted_masked_mean(per_patch[-1], maskf, maskf).detach(),
            "mlm_acc": (logits[mask].argmax(-1) == labels[mask]).float().mean().detach(),
        }
        for k, d in enumerate(self.dds_depths):
            terms[f"loss_mim_d{d}"] = objective.losses[k].detach()
            terms[f"beta_d{d}"] = betas[k].detach()
        if self.cls_pt:
            loss_cls = F.cross_entropy(self._cls_pt_logits(x_cls)[mask].float(), labels[mask])
            terms["loss_cls_pt"] = loss_cls.detach()
            total = total + loss_cls
        if self.dds_beta.theta is not None and self.dds_beta_reg > 0:
            reg = self.dds_beta.regularizer()
            total = total + self.dds_beta_reg * reg
            terms["loss_beta_reg"] = reg.detach()
        terms["loss_dds"] = total.detach()
        self._loss_terms = terms
        return total, logits, maskf

    # on_step_end / set_progress / no_weight_decay: pretrain.dds.DDSBetaSchedule, shared with MAE + DDS.


# ---------------------------------------------------------------------- registry entries
@register("beitv2", technique="beitv2", model_cls=BEiTv2)
def beitv2(**kwargs) -> BEiTv2:
    """BEiT v2 from explicit constructor arguments."""
    return BEiTv2(**kwargs)


@register("beitv2+dds", technique="beitv2+dds", model_cls=BEiTv2WithDDS)
def beitv2_dds(**kwargs) -> BEiTv2WithDDS:
    """BEiT v2 with deep dynamic supervision on the token-prediction loss."""
    return BEiTv2WithDDS(**kwargs)


def _register_presets() -> None:
    for name, preset in PRESETS.items():
        register("beitv2_" + name, technique="beitv2", model_cls=BEiTv2)(lambda _p=preset, **kw: BEiTv2(**{**_p, **kw}))
        dds_preset = register("beitv2+dds_" + name, technique="beitv2+dds", model_cls=BEiTv2WithDDS)
        dds_preset(lambda _p=preset, **kw: BEiTv2WithDDS(**{**_p, **kw}))


_register_presets()
