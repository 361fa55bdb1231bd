"""Deep Dynamic AutoEncoder (DDAE) and its MAE plug-in form ``mae+dds``.

Both subclass :class:`pretrain.models.mae.MaskedAutoencoderViT` and keep its constructor
arguments, encoder/decoder, masking, target normalisation and forward contract
(``forward(imgs, mask_ratio, noise) -> (loss, pred, mask)`` with ``pred`` from the last layer).
The formulas are this project's interpretation of the paper (only its abstract and introduction
are known); docs/techniques.md (section DDAE) lists every choice. Helpers live in
:mod:`pretrain.dds`.

Deep dynamic supervision (DDS), ``MAEWithDDS`` (registered ``"mae+dds"``)
    The encoder is supervised at several depths ``dds_depths`` (numbers of blocks, 1..depth; the
    last depth is required; default: the ends of the three thirds of the encoder, e.g. (4, 8, 12)).
    The output of block ``k`` goes through the encoder's final norm (``dds_norm="shared"``,
    default: no added structure) or a norm of its own (``"separate"``, not exported), then
    through the *same* decoder as the last layer; its pixel predictions of the masked patches
    are regressed onto the same targets as MAE's. Each depth's loss is the dynamic-weighted mean
    over masked patches (weights ``exp(beta_k * d)`` normalised to mean 1 over each image's masked
    patches, ``d`` the distance map); the total is ``sum_k dds_weights[k] * loss_k`` (+ the
    optional beta regulariser). With ``dds_depths=(depth,)``, ``dds_beta_mode="fixed"``,
    ``dds_beta_start=0`` it is MAE's loss exactly. The state dict is MAE's plus ``dds_beta.theta``
    in learnable mode (and ``dds_norms.*`` with separate norms).

Dynamic feature self-distillation, ``DDAE`` (registered ``"ddae"``)
    DDS plus an EMA teacher (a copy of the encoder, no gradient, eval mode) that encodes *all*
    patches. At each distilled depth ``k`` (default: every supervised depth) the student's
    prediction for the masked patches - the decoder's last hidden states (after
    ``decoder_norm``) of the depth-``k`` decoding, mapped to the encoder width by a linear head
    ``distill_heads`` - is regressed onto the teacher's depth-``k`` block output at those patches,
    normalised by a LayerNorm without affine parameters (``distill_target_norm``); per-patch
    smooth-L1 (``distill_loss``) weighted by the same dynamic weights as that depth's pixel loss.
    Why masked positions (``distill_tokens="masked"``): the distance map and its weighting are
    only defined there, and predicting the features of hidden content is the task that gets
    harder with distance; ``"visible"`` instead aligns the student's own depth-``k`` tokens of the
    visible patches with the teacher's at the same patches (weights uniform, as all distances
    are 0). Teacher momentum follows ``ema_momentum -> ema_momentum_end`` by a half cosine over
    training, applied in ``on_step_end``: ``t <- m t + (1 - m) s`` for trainable student tensors
    (frozen ones such as the sin-cos position embedding are copied).
    The teacher is the sub-module ``teacher`` (keys ``teacher.*`` in ``state_dict()``: saved and
    restored with the model by every checkpoint), its parameters have ``requires_grad=False`` (an
    optimizer built from trainable parameters never sees them), and ``encoder_state_dict()``
    exports the student encoder (the teacher with ``export_teacher=True``).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimbench.errors import MimbenchError
from pretrain import dds
from pretrain import masking, targets
from pretrain.models.mae import PRESETS, LayerNorm6, MaskedAutoencoderViT
from pretrain.registry import register

DDS_NORMS = ("shared", "separate")
DISTILL_TOKENS = ("masked", "visible")
DISTILL_TARGET_NORMS = ("layernorm", "none")


# Re-exported: the DDS depth rules live with the shared DDS objective in :mod:`pretrain.dds`.
default_dds_depths = dds.default_dds_depths


class MAEWithDDS(dds.DDSBetaSchedule, MaskedAutoencoderViT):
    """MAE trained with deep dynamic supervision; see the module docstring.

    Args (besides MAE's, all keyword-only):
        dds_depths: supervised depths (block counts), must include ``depth``; ``None`` = default.
        dds_weights: loss weight per supervised depth (same order as the sorted depths); ``None`` = all 1.
        dds_norm: ``"shared"`` (encoder's final norm on every depth) or ``"separate"``.
        dds_beta_mode, dds_beta_start, dds_beta_end, dds_beta_schedule, dds_beta_bound:
            :class:`pretrain.dds.DynamicBeta` (default learnable, -1 -> 1, cosine, bound 0.5).
        dds_beta_reg: weight of the L2 penalty on the learnable offsets (default 0).
        dds_distance_metric, dds_distance_norm: :func:`pretrain.dds.distance_map` (euclidean, max).
    """

    _persistent_progress = False  # the plug-in keeps MAE's state-dict keys

    def __init__(
        self,
        *args,
        dds_depths: Sequence[int] | None = None,
        dds_weights: Sequence[float] | None = None,
        dds_norm: str = "shared",
        dds_beta_mode: str = "learnable",
        dds_beta_start: float = -1.0,
        dds_beta_end: float = 1.0,
        dds_beta_schedule: str = "cosine",
        dds_beta_bound: float = 0.5,
        dds_beta_reg: float = 0.0,
        dds_distance_metric: str = "euclidean",
        dds_distance_norm: str = "max",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dds_depths, self.dds_weights = dds.check_dds_args(
            self.depth, dds_depths, dds_weights, dds_distance_metric, dds_distance_norm, dds_beta_reg
        )
        if dds_norm not in DDS_NORMS:
            raise MimbenchError(f"Unknown dds_norm {dds_norm!r}.", f"Use one of: {', '.join(DDS_NORMS)}.")
        self.dds_norm = dds_norm
        self.dds_beta_reg = float(dds_beta_reg)
        self.dds_distance_metric = dds_distance_metric
        self.dds_distance_norm = dds_distance_norm
        self.dds_beta = dds.DynamicBeta(
            len(self.dds_depths),
            mode=dds_beta_mode,
            beta_start=dds_beta_start,
            beta_end=dds_beta_end,
            schedule=dds_beta_schedule,
            bound=dds_beta_bound,
            persistent_progress=self._persistent_progress,
        )
        # Separate norms for the intermediate depths only; the last depth uses the encoder's norm.
        self.dds_norms = (
            nn.ModuleList([copy.deepcopy(self.norm) for _ in self.dds_depths[:-1]]) if dds_norm == "separate" else None
        )

    # ------------------------------------------------------------------ pieces
    def _encode_depths(self, imgs, mask_ratio, noise):
        """Encoder features at every supervised depth, each normalised as configured.

        Returns ``(feats, mask, ids_restore)``, ``feats`` a list of ``N x (1+K_k) x D`` in
        ``dds_depths`` order (the last one is MAE's latent).
        """
        inter = [d for d in self.dds_depths if d < self.depth]
        if inter:
            latent, mask, ids_restore, raw = self.forward_encoder(imgs, mask_ratio, noise, [d - 1 for d in inter])
        else:
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
            raw = []
        feats = []
        for i, x in enumerate(raw):
            norm = self.norm if self.dds_norms is None else self.dds_norms[i]
            feats.append(norm(x))
        feats.append(latent)
        return feats, mask, ids_restore

    def _decode_depth(self, x: torch.Tensor, ids_restore: torch.Tensor):
        """``(decoder hidden states or None, pred N x L x P)`` for one depth's features."""
        return None, self.forward_decoder(x, ids_restore)

    def _dds(self, imgs, mask_ratio, noise):
        """Shared DDS computation; returns a dict of intermediate results (see ``forward``)."""
        if masking.num_keep(self.num_patches, mask_ratio) == 0:
            raise dds.NoVisiblePatchError(
                f"mask_ratio={mask_ratio} leaves no visible patch of {self.num_patches}, so the distance "
                "map (distance of each masked patch to the nearest visible one) is undefined.",
                f"Use a mask ratio below {1 - 1 / self.num_patches:.4f}.",
            )
        feats, mask, ids_restore = self._encode_depths(imgs, mask_ratio, noise)
        target = self.forward_target(imgs)
        betas = self.dds_beta()
        hidden, preds, per_patch = [], [], []
        for feat in feats:
            h, pred = self._decode_depth(feat, ids_restore)
            hidden.append(h)
            preds.append(pred)
            per_patch.append(targets.per_patch_mse(pred, target))
        # _dds has checked on the host that every image keeps a visible patch.
        objective = dds.deep_dynamic_supervision(per_patch, mask, self.img_size // self.patch_size, betas,
                                                 self.dds_weights, self.dds_distance_metric, self.dds_distance_norm)
        total, rec, weights = objective.total, objective.losses, objective.weights
        terms: dict[str, torch.Tensor] = {"loss_rec": rec[-1].detach()}
        for k, d in enumerate(self.dds_depths):
            terms[f"loss_rec_d{d}"] = rec[k].detach()
            terms[f"beta_d{d}"] = betas[k].detach()
        if self.dds_beta.theta is not None and self.dds_beta_reg > 0:
            reg = self.dds_beta.regularizer()
            total = total + self.dds_beta_reg * reg
            terms["loss_beta_reg"] = reg.detach()
        return dict(
            feats=feats, mask=mask, ids_restore=ids_restore, weights=weights,
            hidden=hidden, preds=preds, total=total, terms=terms,
        )

    # ------------------------------------------------------------------ contract
    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        out = self._dds(imgs, mask_ratio, noise)
        out["terms"]["loss_dds"] = out["total"].detach()
        self._loss_terms = out["terms"]
        return out["total"], out["preds"][-1], out["mask"]

    # on_step_end / set_progress / no_weight_decay: pretrain.dds.DDSBetaSchedule (the plug-in keeps MAE's
    # state-dict keys, so the beta progress is not in checkpoints: pretrain.main calls set_progress on resume).


class TeacherEncoder(nn.Module):
    """Frozen copy of a MAE encoder (timm key layout: cls_token, pos_embed, patch_embed, blocks, norm)
    that encodes every patch of an image."""

    def __init__(self, student: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(student.cls_token.detach().clone(), requires_grad=False)
        self.pos_embed = nn.Parameter(student.pos_embed.detach().clone(), requires_grad=False)
        self.patch_embed = copy.deepcopy(student.patch_embed)
        self.blocks = copy.deepcopy(student.blocks)
        self.norm = copy.deepcopy(student.norm)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Un-normalised outputs ``N x (1+L) x D`` after each block count in ``layers``."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        out = {}
        last = max(layers)
        for i, blk in enumerate(self.blocks[:last]):
            x = blk(x)
            if i + 1 in layers:
                out[i + 1] = x
        return out


class DDAE(MAEWithDDS):
    """DDS + dynamic feature self-distillation from an EMA teacher; see the module docstring.

    Args (besides :class:`MAEWithDDS`'s, keyword-only):
        distill_weight: weight of the distillation losses (0 disables distillation and the teacher's use).
        distill_depths: distilled depths, a subset of ``dds_depths`` (``None`` = all of them).
        distill_tokens: ``"masked"`` (decoder hidden states at masked patches) or ``"visible"``.
        distill_target_norm: ``"layernorm"`` (no affine) or ``"none"`` on the teacher features.
        distill_loss: ``"smooth_l1"``, ``"mse"`` or ``"cosine"``.
        ema_momentum, ema_momentum_end: teacher momentum, cosine from the first to the second.
        export_teacher: ``encoder_state_dict()`` returns the teacher instead of the student.
    """

    _persistent_progress = True

    def __init__(
        self,
        *args,
        distill_weight: float = 1.0,
        distill_depths: Sequence[int] | None = None,
        distill_tokens: str = "masked",
        distill_target_norm: str = "layernorm",
        distill_loss: str = "smooth_l1",
        ema_momentum: float = 0.996,
        ema_momentum_end: float = 1.0,
        export_teacher: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if float(distill_weight) < 0:
            raise MimbenchError(f"distill_weight must be >= 0, got {distill_weight!r}.")
        if distill_tokens not in DISTILL_TOKENS:
            raise MimbenchError(f"Unknown distill_tokens {distill_tokens!r}.", f"Use one of: {', '.join(DISTILL_TOKENS)}.")
        if distill_target_norm not in DISTILL_TARGET_NORMS:
            raise MimbenchError(
                f"Unknown distill_target_norm {distill_target_norm!r}.", f"Use one of: {', '.join(DISTILL_TARGET_NORMS)}."
            )
        if distill_loss not in ("smooth_l1", "mse", "cosine"):
            raise MimbenchError(f"Unknown distill_loss {distill_loss!r}.", "Use one of: smooth_l1, mse, cosine.")
        if not (0.0 <= float(ema_momentum) <= float(ema_momentum_end) <= 1.0):
            raise MimbenchError(
                f"Need 0 <= ema_momentum <= ema_momentum_end <= 1, got {ema_momentum!r}, {ema_momentum_end!r}."
            )
        depths = self.dds_depths if distill_depths is None else dds.check_depths(
            "distill_depths", distill_depths, self.depth, False
        )
        if not set(depths) <= set(self.dds_depths):
            raise MimbenchError(f"distill_depths={tuple(depths)} must be a subset of dds_depths={self.dds_depths}.")
        self.distill_weight = float(distill_weight)
        self.distill_depths = tuple(depths)
        self.distill_tokens = distill_tokens
        self.distill_target_norm = distill_target_norm
        self.distill_loss = distill_loss
        self.ema_momentum = float(ema_momentum)
        self.ema_momentum_end = float(ema_momentum_end)
        self.export_teacher = bool(export_teacher)
        if self.export_teacher and self.distill_weight == 0:
            raise MimbenchError("export_teacher=True needs a teacher, but distill_weight=0 disables it.")
        # Without distillation there is no teacher and no head: no dead weights, and no parameter
        # that would sit unused in every step (which DistributedDataParallel rejects).
        if self.distill_weight > 0:
            in_dim = self.decoder_embed.out_features if distill_tokens == "masked" else self.embed_dim
            self.distill_heads = nn.ModuleList([nn.Linear(in_dim, self.embed_dim) for _ in self.distill_depths])
            for head in self.distill_heads:
                self._init_weights(head)
            self.teacher = TeacherEncoder(self)
            self.teacher.eval()
        else:
            self.distill_heads = None
            self.teacher = None
        # The momentum of the last teacher update (logged; ema_momentum until the first update): a buffer
        # updated in place outside forward, so a compiled forward neither guards on nor re-traces its value.
        self.register_buffer("last_momentum", torch.tensor(self.ema_momentum), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher always runs in inference mode
        return self

    def _decode_depth(self, x: torch.Tensor, ids_restore: torch.Tensor):
        """MAE's ``forward_decoder`` that also returns the hidden states after ``decoder_norm``
        (``N x (1+L) x decoder_dim``); a test checks ``pred`` equals ``forward_decoder``'s."""
        x = self.decoder_embed(x)
        n, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        x_ = masking.gather_tokens(torch.cat([x[:, 1:, :], mask_tokens], dim=1), ids_restore)
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        hidden = self.decoder_norm(x)
        return hidden, self.decoder_pred(hidden)[:, 1:, :]

    def _teacher_targets(self, imgs: torch.Tensor) -> dict[int, torch.Tensor]:
        feats = self.teacher(imgs, self.distill_depths)
        if self.distill_target_norm == "layernorm":
            feats = {d: F.layer_norm(f, f.shape[-1:]) for d, f in feats.items()}
        return feats

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        out = self._dds(imgs, mask_ratio, noise)
        total, terms, mask = out["total"], out["terms"], out["mask"]
        terms["loss_dds"] = total.detach()
        if self.distill_weight > 0:
            teacher = self._teacher_targets(imgs)
            distill_total = None
            for j, d in enumerate(self.distill_depths):
                k = self.dds_depths.index(d)
                t_patch = teacher[d][:, 1:, :]  # N x L x D in patch order
                if self.distill_tokens == "masked":
                    student = self.distill_heads[j](out["hidden"][k][:, 1:, :])
                    per_patch = dds.feature_loss(student, t_patch, self.distill_loss)
                    loss = dds.weighted_masked_mean(per_patch, out["weights"][k], mask)
                else:
                    len_keep = masking.num_keep(self.num_patches, mask_ratio)
                    vis_ids = torch.argsort(out["ids_restore"], dim=1)[:, :len_keep]  # ids_shuffle
                    student = self.distill_heads[j](out["feats"][k][:, 1 : 1 + len_keep, :])
                    loss = dds.feature_loss(student, masking.gather_tokens(t_patch, vis_ids), self.distill_loss).mean()
                terms[f"loss_distill_d{d}"] = loss.detach()
                distill_total = loss if distill_total is None else distill_total + loss
            terms["loss_distill"] = distill_total.detach()
            total = total + self.distill_weight * distill_total
        terms["ema_momentum"] = self.last_momentum.clone()  # the value of this step, not of a later update
        self._loss_terms = terms
        return total, out["preds"][-1], mask

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``t <- m * t + (1 - m) * s`` for the trainable student encoder tensors; frozen ones copied.

        The EMA runs as two multi-tensor kernels (``torch._foreach_mul_`` / ``_foreach_add_``)
        instead of two launches per tensor; the arithmetic (multiply, then add with ``alpha``) is
        the per-tensor update's, so the teacher is the same bit for bit."""
        ema_t, ema_s, copy_t, copy_s = [], [], [], []
        for name, t in self.teacher.named_parameters():
            s = self.get_parameter(name)
            if s.requires_grad:
                ema_t.append(t)
                ema_s.append(s.detach().to(t.dtype))
            else:
                copy_t.append(t)
                copy_s.append(s.detach())
        for name, t in self.teacher.named_buffers():
            copy_t.append(t)
            copy_s.append(self.get_buffer(name))
        if ema_t:
            torch._foreach_mul_(ema_t, momentum)
            torch._foreach_add_(ema_t, ema_s, alpha=1.0 - momentum)
        if copy_t:
            torch._foreach_copy_(copy_t, copy_s)
        self.last_momentum.fill_(momentum)

    def on_step_end(self, it: int, total_its: int) -> None:
        """EMA teacher update with the momentum at progress ``(it + 1) / total_its``, then the beta schedule."""
        if self.teacher is not None:
            progress = (it + 1) / max(int(total_its), 1)
            self.update_teacher(dds.ema_momentum(progress, self.ema_momentum, self.ema_momentum_end))
        super().on_step_end(it, total_its)

    def set_progress(self, next_it: int, total_its: int) -> None:
        """Resume: the beta schedule and the logged teacher momentum (the one of step ``next_it - 1``)
        as an uninterrupted run has them before step ``next_it``."""
        super().set_progress(next_it, total_its)
        if self.teacher is not None and next_it > 0:
            self.last_momentum.fill_(dds.ema_momentum(next_it / max(int(total_its), 1), self.ema_momentum,
                                                    self.ema_momentum_end))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        if self.export_teacher:
            return {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        return super().encoder_state_dict()


# ---------------------------------------------------------------------- registry entries
def _build(cls, preset: dict, kwargs: dict) -> MaskedAutoencoderViT:
    args = dict(mlp_ratio=4.0, norm_layer=LayerNorm6)
    args.update(preset)
    args.update(kwargs)
    return cls(**args)


@register("ddae", technique="ddae", model_cls=DDAE)
def ddae(**kwargs) -> DDAE:
    """DDAE from explicit MAE constructor arguments plus DDS/distillation knobs."""
    return _build(DDAE, {}, kwargs)


@register("mae+dds", technique="mae+dds", model_cls=MAEWithDDS)
def mae_dds(**kwargs) -> MAEWithDDS:
    """MAE with deep dynamic supervision (same architecture and state-dict keys as MAE)."""
    return _build(MAEWithDDS, {}, kwargs)


def _register_presets() -> None:
    for name, preset in PRESETS.items():
        suffix = name[len("mae_"):]  # e.g. "vit_base_patch16"
        ddae_preset = register("ddae_" + suffix, technique="ddae", model_cls=DDAE)
        ddae_preset(lambda _p=preset, **kw: _build(DDAE, _p, kw))
        dds_preset = register("mae+dds_" + suffix, technique="mae+dds", model_cls=MAEWithDDS)
        dds_preset(lambda _p=preset, **kw: _build(MAEWithDDS, _p, kw))


_register_presets()
