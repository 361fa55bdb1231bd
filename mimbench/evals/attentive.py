"""Attentive probing of a frozen encoder: a learned attention-pooling head on its tokens, then a linear classifier.

Three head presets (``head.preset``), each as its source builds it:

- ``cae`` (Atten4Vis/CAE, ``tools/run_attentive.py``): one zero-initialised query; LayerNorms on the query, the
  keys and the values; one multi-head cross-attention (q/k/v ``Linear`` without bias plus learned q and v biases, as
  CAE's ``CrossAttention``; the key bias is zero) with its output projection; no residual, no MLP; then
  ``BatchNorm1d(affine=False, eps=1e-6)`` and ``Linear``. Keys: every token after the final norm (``tokens="all"``).
  A zero query gives ``LN(0) = 0``, so every key gets the same weight at initialisation.
- ``ep`` (Efficient Probing, billpsomas/efficient-probing ``poolings/ep.py``, arXiv 2506.10178): Q learned queries
  (``randn * 0.02``) attend with one head to the raw tokens (no key projection, scale ``D ** -0.5``); one value
  ``Linear(D, D, bias=False)`` whose output is split in Q chunks of D/Q, query q reading chunk q; the Q outputs are
  concatenated back to D. Keys: patch tokens only (class token and registers excluded), taken from the last block
  before the final norm as EP's ``models_vit.forward_features`` returns them (``final_norm=False``). Classifier: the
  MAE linear probe's ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear`` (EP runs in MAE's linprobe code base).
- ``vjepa`` (facebookresearch/jepa ``src/models/attentive_pooler.py``): one query (trunc-normal std 0.02);
  ``q = q + xattn(q, LN(x))`` with q ``Linear`` and a joint k/v ``Linear`` (bias on), then
  ``q = q + MLP(LN(q))`` (ratio ``head.mlp_ratio``, GELU); the output projection V-JEPA defines is never applied, so
  it is not built here; then ``Linear``. Linear layers of the pooler trunc-normal std 0.02 (bias 0), the MLP's
  second layer divided by sqrt(2), as V-JEPA's ``_rescale_blocks``. Keys: patch tokens after the final norm
  (V-JEPA's encoders have no class token).

The head count of the CAE and V-JEPA attention is the encoder's own (``head.num_heads=None``), as both sources pass
the encoder's ``num_heads``; EP uses one.

Training (:mod:`mimbench.engine` through :mod:`mimbench.evals.runner`): the encoder is frozen, in eval mode, and
runs without gradients under the run's precision; ``optim.name`` ``sgd`` (CAE), ``lars`` (EP: the MAE linear
probe's LARS, :func:`mimbench.evals.linear.build_optimizer`) or ``adamw`` (V-JEPA; weight decay on matrices only,
cosine from ``optim.weight_decay`` to ``optim.final_weight_decay`` per step when that is set). Training images go
through RandomResizedCrop (bicubic) + flip (``augment.mode="rrc_flip"``) or timm ``create_transform`` with AutoAugment
and random erasing (``"timm"``); validation through Resize(int(S·256/224), bicubic) + CenterCrop(S).

``mode="cached"`` (the demo): the selected tokens of the un-augmented images are computed once per run, kept in
memory (not on disk as the linear probe's class tokens are: the tokens of a split are ``N`` times larger), and the
head trains on them; recorded as a deviation. Each process computes all tokens itself (demo scale).

Blocks (``layers``, ``--layers``): by default the head attends to the last block's tokens as above; ``layers`` may
name another block (``7``, ``-2`` counts from the end), whose tokens are read the same way - through the final norm
(:func:`mimbench.evals.features.block_tokens`, as the linear probe reads a block and timm's
``forward_intermediates(norm=True)``) or, with ``head.final_norm=False``, as the block outputs them. The head reads
one block's tokens: the combined forms of the linear probe (``concat:N``, ``mean:...``, ``all``) are refused.

Epoch (``selection``, ``--select-on``): a config whose source reports its best epoch (EP; ``selection.best_epoch``)
scores the head after every epoch on a selection set and reports the epoch that scores best there (the later one on a
tie): by default a held-out part of the training set (``selection.holdout``, 10 %, drawn with the run's seed, read
without augmentation and never trained on; :func:`mimbench.evals.linear.holdout_split`), with
``selection.on="val"`` the validation split, as the source selects. ``top1`` / ``top5`` are then the selected epoch's
validation accuracy, ``last_epoch_top1`` / ``last_epoch_top5`` the last epoch's, and the record's
``protocol.selection`` says where the epoch was selected, which one and its score on each epoch there
(:class:`EpochSelection`). Configs that report the last epoch (CAE's, V-JEPA's, the demo's) refuse
``--select-on``.

Refused before any work (besides a head section its preset cannot build): a patch-token head (``head.tokens="patch"``)
reading after the final norm (``head.final_norm``) an encoder whose final norm acts on pooled features only (EVA-02 as
timm ships it: there are no normed patch tokens to attend to).

The record's protocol states the preset, the head's parameter count, the block and which tokens were used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn
from torchvision import transforms as T

from mimbench import encoders
from mimbench.config import format_override
from mimbench.data import dataset_stats
from mimbench.data.transforms import finetune_train_transform
from mimbench.engine import fit, load_checkpoint, save_checkpoint
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.features import block_tokens, eval_transform, limited, resolve_layers
from mimbench.encoders.families import pooled_final_norm
from mimbench.evals.linear import StepBatchNorm1d, holdout_split
from mimbench.evals.linear import build_optimizer as linear_optimizer
from mimbench.fastpath import autocast_factory, match_attention, under_autocast
from mimbench.schema import ATTENTIVE_OPTIMIZERS, ATTENTIVE_PRESETS

CACHED_DEVIATION = "attentive probe on tokens of un-augmented images, computed once"
#: Presets whose pooling has exactly one query.
SINGLE_QUERY = ("cae", "vjepa")
#: The per-epoch scores and the best head of a run that selects its epoch (next to its checkpoints).
SELECTION_FILE = "epoch_selection.pt"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head scaled dot-product attention of queries ``q`` (B×Q×D) over keys ``k`` and values ``v`` (B×N×D):
    ``(outputs B×Q×D, weights B×heads×Q×N)``."""
    b, nq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    weights = (split(q) * (d // heads) ** -0.5 @ split(k).transpose(-2, -1)).softmax(dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, nq, d), weights


class CAEPooling(nn.Module):
    """CAE's attentive block: zero query, LN on q/k/v, cross-attention with output projection (module docstring)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        for layer in (self.q, self.k, self.v, self.proj):
            trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        q = F.linear(self.norm_q(self.query.expand(x.shape[0], -1, -1)), self.q.weight, self.q_bias)
        k = self.k(self.norm_k(x))
        v = F.linear(self.norm_v(x), self.v.weight, self.v_bias)
        out, weights = attend(q, k, v, self.heads)
        out = self.proj(out)[:, 0]
        return (out, weights) if return_attention else out


class EPPooling(nn.Module):
    """Efficient Probing: Q queries on the raw tokens, one value projection split across the queries."""

    def __init__(self, dim: int, num_queries: int):
        super().__init__()
        if dim % num_queries:
            raise MimbenchError(f"EP splits the value (width {dim}) across {num_queries} queries, which does not "
                                "divide it.", "Set head.num_queries to a divisor of the encoder's width.")
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        weights = (self.query * d ** -0.5 @ x.transpose(-2, -1)).softmax(dim=-1)  # B×Q×N
        v = self.v(x).reshape(b, n, self.num_queries, d // self.num_queries)
        out = torch.einsum("bqn,bnqc->bqc", weights, v).reshape(b, d)
        return (out, weights.unsqueeze(1)) if return_attention else out


class VJEPAPooling(nn.Module):
    """V-JEPA's attentive pooler (depth 1): residual cross-attention on LN(keys), then a residual MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        trunc_normal_(self.query, std=0.02)
        for layer in (self.q, self.kv, self.mlp.fc1, self.mlp.fc2):
            trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.mlp.fc2.weight.data.div_(math.sqrt(2.0))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        q = self.query.expand(x.shape[0], -1, -1)
        k, v = self.kv(self.norm1(x)).chunk(2, dim=-1)
        out, weights = attend(self.q(q), k, v, self.heads)
        q = q + out
        q = (q + self.mlp(self.norm2(q)))[:, 0]
        return (q, weights) if return_attention else q


class AttentiveHead(nn.Module):
    """Pooling, then ``BatchNorm1d(affine=False)`` (CAE, EP; :class:`StepBatchNorm1d`) or nothing (V-JEPA), then
    ``Linear``. Input: tokens B×N×D; output: scores B×C."""

    def __init__(self, pooling: nn.Module, dim: int, num_classes: int, batch_norm: bool):
        super().__init__()
        self.pooling = pooling
        self.norm = StepBatchNorm1d(dim, eps=1e-6) if batch_norm else None
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pooling(tokens.float())
        return self.linear(self.norm(x) if self.norm is not None else x)

    def commit(self) -> None:
        """Apply the batch norm's kept micro-batch statistics (once per optimizer step, on every rank)."""
        if self.norm is not None:
            self.norm.commit()


def build_head(preset: str, dim: int, num_classes: int, *, heads: int, num_queries: int = 1,
               mlp_ratio: float = 4.0) -> AttentiveHead:
    """The ``preset`` head for tokens of width ``dim``; ``heads``: attention heads (CAE, V-JEPA);
    ``num_queries``: EP's Q (CAE and V-JEPA have one query)."""
    if preset not in ATTENTIVE_PRESETS:
        raise MimbenchError(f"Unknown attentive head preset {preset!r}.", f"Use one of {ATTENTIVE_PRESETS}.")
    if preset in SINGLE_QUERY and num_queries != 1:
        raise MimbenchError(f"The {preset} head has one query, not head.num_queries={num_queries}.",
                            "Leave head.num_queries at 1 for cae and vjepa (Q queries are the ep preset's).")
    if preset != "ep" and dim % heads:
        raise MimbenchError(f"{heads} attention heads do not divide the token width {dim}.",
                            "Set head.num_heads to a divisor of the encoder's width (None: the encoder's own).")
    if preset == "cae":
        head = AttentiveHead(CAEPooling(dim, heads), dim, num_classes, batch_norm=True)
        trunc_normal_(head.linear.weight, std=0.01)
    elif preset == "ep":
        head = AttentiveHead(EPPooling(dim, num_queries), dim, num_classes, batch_norm=True)
        trunc_normal_(head.linear.weight, std=0.01)
    else:
        head = AttentiveHead(VJEPAPooling(dim, heads, mlp_ratio), dim, num_classes, batch_norm=False)
        return head  # V-JEPA's classifier keeps torch's default Linear initialisation
    nn.init.zeros_(head.linear.bias)
    return head


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def encoder_heads(model: nn.Module) -> int:
    """Attention heads of the encoder's blocks (timm ViT / Beit)."""
    return int(model.blocks[0].attn.num_heads)


def _forward_catching(model: nn.Module, module: nn.Module, x: torch.Tensor, *, inputs: bool) -> torch.Tensor:
    """The input (``inputs``) or output of ``module`` during ``model.forward_features(x)``."""
    kept = []
    hook = module.register_forward_hook(lambda m, args, out: kept.append(args[0] if inputs else out))
    try:
        model.forward_features(x)
    finally:
        hook.remove()
    return kept[0]


def encoder_tokens(model: nn.Module, x: torch.Tensor, *, tokens: str, final_norm: bool,
                   block: int | None = None) -> torch.Tensor:
    """Tokens (B×N×D) of images ``x`` from the frozen ``model``'s block ``block`` (0-based, negative from the end;
    None: the last): after (``final_norm``) or before its final norm; ``tokens="all"`` every token, ``"patch"``
    without the class token and registers (timm ``num_prefix_tokens``)."""
    depth = len(model.blocks)
    block = depth - 1 if block is None else block % depth
    if block == depth - 1:  # forward_features' output, or what goes into the final norm
        out = model.forward_features(x) if final_norm else _forward_catching(model, model.norm, x, inputs=True)
    elif final_norm:  # through the final norm, as the linear probe reads a block
        out = block_tokens(model, x, [block])[0]
    else:
        out = _forward_catching(model, model.blocks[block], x, inputs=False)
    return out if tokens == "all" else out[:, int(getattr(model, "num_prefix_tokens", 1)):]


def attended_block(layers, depth: int) -> int:
    """The block (0-based) whose tokens the head attends to, from a ``layers`` value (``last`` or a block index);
    MimbenchError for a value naming several blocks or a block the encoder lacks."""
    combine, blocks = resolve_layers(layers, depth)
    if combine != "single":
        raise MimbenchError(f"layers = {layers!r} names {len(blocks)} blocks; the attentive head attends to the "
                            "tokens of one.", "Use --layers last or a block index (7; -2 counts from the end).")
    return blocks[0]


def describe_tokens(model: nn.Module, *, tokens: str, final_norm: bool, block: int | None = None) -> str:
    """The record's ``tokens``: which tokens the head attends to, and how many."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    patches = int(model.patch_embed.num_patches) if hasattr(model.patch_embed, "num_patches") else None
    last = block is None or block % len(model.blocks) == len(model.blocks) - 1
    which = "the last block" if last else f"block {block % len(model.blocks)}"
    where = f"of {which} before the final norm" if not final_norm else (
        "after the final norm" if last else f"of {which} through the final norm")
    if tokens == "all":
        return f"all {(patches or 0) + prefix} tokens (class/register tokens: {prefix}) {where}"
    return f"{patches} patch tokens {where}; class token and registers ({prefix}) excluded"


def build_optimizer(head: nn.Module, optim, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (CAE), the MAE linear probe's LARS (EP) or AdamW (V-JEPA; ``optim``: the config's section).
    Weight decay on matrices only (1-D parameters: none), the first param group."""
    name = str(optim["name"]).lower()
    if name not in ATTENTIVE_OPTIMIZERS:
        raise MimbenchError(f"Unknown attentive-probe optimizer {name!r}.",
                            f"Use optim.name in {ATTENTIVE_OPTIMIZERS}.")
    if name == "lars":
        return linear_optimizer(head, optim, lr)
    wd = float(optim["weight_decay"])
    groups = [{"params": [p for p in head.parameters() if p.ndim > 1], "weight_decay": wd},
              {"params": [p for p in head.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(optim["momentum"]))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim["betas"]))


def cosine_weight_decay(optimizer, start: float, final: float | None, it: int, total: int) -> None:
    """V-JEPA's cosine weight-decay schedule: the first group's decay after optimizer step ``it`` (0-based) of
    ``total``; nothing when ``final`` is None (constant decay)."""
    if final is None:
        return
    progress = min((it + 1) / max(total, 1), 1.0)
    optimizer.param_groups[0]["weight_decay"] = final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_transform(run, size: int):
    """(transform, description) of ``augment.mode``: RandomResizedCrop (bicubic) + flip, or timm's
    ``create_transform`` with AutoAugment and random erasing."""
    aug = run.cfg.augment
    mean, std = dataset_stats(run.data)
    if aug.mode == "timm":
        return finetune_train_transform(img_size=size, mean=mean, std=std, auto_augment=aug.auto_augment,
                                        re_prob=float(aug.re_prob), re_mode=aug.re_mode, re_count=int(aug.re_count))
    scale = tuple(aug.scale)
    transform = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    return transform, f"randomresizedcrop{size}(scale={scale},bicubic)/hflip/normalize(mean={mean},std={std})"


@dataclass
class Probe:
    """What an attentive probe trains and scores: the frozen encoder (None when the inputs are cached tokens), the
    training batches, the validation set, the classes and what the record says about them."""

    encoder: nn.Module | None
    loader: Any
    train_size: int
    val_set: Any
    eval_batch: int
    classes: list
    transforms: dict
    skipped: dict
    holdout_set: Any = None  # training items held out to select the epoch on (never trained on); None: no hold-out


def _frozen_encoder(run, size: int) -> nn.Module:
    model = encoders.load_encoder(run.encoder, img_size=size, layout=run.layout).to(run.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    match_attention(model, run.precision, run.device)
    return model


def compute_tokens(model: nn.Module, dataset, *, batch_size: int, precision: str, tokens: str,
                   final_norm: bool, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tokens (N×T×D float32, on the model's device) and labels (N) of every item of ``dataset``, under
    ``torch.no_grad`` and the autocast of ``precision``."""
    device = next(model.parameters()).device
    autocast = autocast_factory(precision, device)
    kept, labels = [], []
    for x, y, *_ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with torch.no_grad(), autocast():
            kept.append(encoder_tokens(model, x.to(device), tokens=tokens, final_norm=final_norm,
                                       block=block).float())
        labels.append(torch.as_tensor(y, dtype=torch.int64).to(device))
    if not kept:
        raise MimbenchError("The dataset split is empty; no tokens to compute.", "Check the data path and split.")
    return torch.cat(kept), torch.cat(labels)


def _cached_probe(run, model: nn.Module, size: int, batch: int, accum: int) -> Probe:
    """Tokens of the un-augmented images, computed once and kept in memory; batches index them on the device."""
    cfg = run.cfg
    if CACHED_DEVIATION not in run.deviations:
        run.deviations.insert(0, CACHED_DEVIATION)
    val_tf, val_desc = eval_transform(run.data, size)
    train_set = runner.build_split(run, "train", transform=val_tf, img_size=size)
    val_set = runner.build_split(run, "val", transform=val_tf, img_size=size)
    skipped, classes = runner.skipped(train_set, val_set), list(train_set.classes)
    common = dict(batch_size=int(cfg.feature_batch_size), precision=run.precision, tokens=cfg.head.tokens,
                  final_norm=bool(cfg.head.final_norm), block=attended_block(cfg.layers, len(model.blocks)))
    tx, ty = compute_tokens(model, limited(train_set, cfg.data.limit_train), **common)
    vx, vy = compute_tokens(model, limited(val_set, cfg.data.limit_val), **common)
    holdout_set = None
    if selects_on_holdout(cfg):
        keep, held = (torch.from_numpy(i).to(tx.device)
                      for i in holdout_split(len(ty), float(cfg.selection.holdout), run.seed))
        holdout_set = torch.utils.data.TensorDataset(tx[held].cpu(), ty[held].cpu())
        tx, ty = tx[keep], ty[keep]
    return Probe(encoder=None, loader=runner.TensorBatches(run, tx, ty, batch, accum), train_size=len(tx),
                 val_set=torch.utils.data.TensorDataset(vx.cpu(), vy.cpu()), eval_batch=int(cfg.feature_batch_size),
                 classes=classes, transforms={"train_transform": val_desc + " (no augmentation)",
                                              "val_transform": val_desc}, skipped=skipped, holdout_set=holdout_set)


def _protocol_probe(run, model: nn.Module, size: int, batch: int, accum: int) -> Probe:
    """The head on the frozen encoder's tokens of augmented images (``augment``)."""
    cfg = run.cfg
    train_tf, train_desc = _train_transform(run, size)
    val_tf, val_desc = eval_transform(run.data, size)
    train_set = runner.build_split(run, "train", transform=train_tf, img_size=size)
    val_set = runner.build_split(run, "val", transform=val_tf, img_size=size)
    skipped, classes = runner.skipped(train_set, val_set), list(train_set.classes)
    train_set, val_set = limited(train_set, cfg.data.limit_train), limited(val_set, cfg.data.limit_val)
    holdout_set = None
    if selects_on_holdout(cfg):  # the held-out images as the val split is read: no augmentation
        keep, held = holdout_split(len(train_set), float(cfg.selection.holdout), run.seed)
        unaugmented = limited(runner.build_split(run, "train", transform=val_tf, img_size=size), cfg.data.limit_train)
        train_set = torch.utils.data.Subset(train_set, keep.tolist())
        holdout_set = torch.utils.data.Subset(unaugmented, held.tolist())
    return Probe(encoder=model,
                 loader=runner.train_loader(run, train_set, batch, accum, num_workers=int(cfg.data.num_workers)),
                 train_size=len(train_set), val_set=val_set, eval_batch=batch, classes=classes,
                 transforms={"train_transform": train_desc, "val_transform": val_desc}, skipped=skipped,
                 holdout_set=holdout_set)


def selects_on_holdout(cfg) -> bool:
    """Whether the run selects its epoch on a hold-out of the training set (``selection``)."""
    return bool(cfg.selection.best_epoch) and cfg.selection.on == "train-holdout"


class EpochSelection:
    """The best epoch of a run that selects one (``selection.best_epoch``): after each epoch's last optimizer step
    (:meth:`step_end`) the head is scored on ``dataset`` (the hold-out or the val split); the best-scoring epoch's
    head weights are kept (the later epoch on a tie). The scores and the kept weights go to ``SELECTION_FILE`` so
    that a resumed run continues the selection: epochs after the training checkpoint's are dropped then (an epoch
    scored but not checkpointed is trained again), with the best head before them, which the file also keeps."""

    def __init__(self, run, head: nn.Module, score_fn, dataset, batch: int, *, on: str, iters_per_epoch: int,
                 resume: bool):
        self.run, self.head, self.score_fn, self.dataset, self.batch = run, head, score_fn, dataset, batch
        self.on, self.iters_per_epoch, self.path = on, max(int(iters_per_epoch), 1), run.out / SELECTION_FILE
        self.scores: dict[int, float] = {}  # epoch (1 = the first) -> top-1 on the selection set
        self.best: dict | None = None  # {"epoch": e, "state": head state dict}
        self.before_best: dict | None = None  # the best of the epochs before best's
        if resume:
            self._restore()

    def _restore(self) -> None:
        """Continue the selection of the run in ``run.out`` (refused when it lacks scores of epochs it ran)."""
        latest = self.run.out / "checkpoint-latest.pt"
        done = int(load_checkpoint(latest)["epoch"]) if latest.is_file() else 0
        saved = load_checkpoint(self.path) if self.path.is_file() else {"scores": {}, "best": None,
                                                                         "before_best": None}
        self.scores = {int(e): float(v) for e, v in saved["scores"].items() if int(e) <= done}
        missing = sorted(set(range(1, done + 1)) - set(self.scores))
        if missing:
            raise MimbenchError(f"The run in {self.run.out} selects its best epoch, but has no selection score of "
                                f"epoch(s) {', '.join(map(str, missing))} that it already ran.",
                                "Start the run again without --resume (or leave selection.best_epoch off).")
        self.best, self.before_best = saved["best"], saved["before_best"]
        if self.best is not None and int(self.best["epoch"]) > done:
            self.best, self.before_best = self.before_best, None

    def step_end(self, it: int) -> None:
        """After optimizer step ``it`` (0-based): score the head when the step ends an epoch."""
        if (it + 1) % self.iters_per_epoch:
            return
        epoch = (it + 1) // self.iters_per_epoch
        self.head.eval()
        top1 = runner.topk_metrics(*runner.score(self.run, self.score_fn, self.dataset, self.batch))["top1"]
        self.head.train()
        self.scores[epoch] = top1
        if self.best is None or top1 >= self.scores[int(self.best["epoch"])]:
            self.before_best = self.best
            self.best = {"epoch": epoch, "state": {k: v.detach().clone() for k, v in self.head.state_dict().items()}}
        if self.run.is_main:
            save_checkpoint(self.path, {"scores": self.scores, "best": self.best, "before_best": self.before_best})

    def record(self, epochs: int, last: dict) -> dict:
        """The record's ``protocol.selection``: where, which epoch of ``epochs``, its score there, the last epoch's
        validation accuracy (``last``: its metrics) and every epoch's score on the selection set."""
        best = int(self.best["epoch"])
        out = {"on": self.on, "selects": "best_epoch", "epoch": best, "of": epochs,
               "select_top1": self.scores[best], "last_epoch_top1": last["top1"],
               "per_epoch": {str(e): self.scores[e] for e in sorted(self.scores)}}
        if self.on == "train-holdout":
            out |= {"holdout": float(self.run.cfg.selection.holdout), "holdout_images": len(self.dataset)}
        return out


def check_config(cfg) -> None:
    """Refuse a head section its preset cannot build, before any work."""
    head = cfg.head
    if head.preset in SINGLE_QUERY and int(head.num_queries) != 1:
        raise MimbenchError(f"The {head.preset} head has one query, not head.num_queries={head.num_queries}.",
                            "Leave head.num_queries at 1 for cae and vjepa (Q queries are the ep preset's).")
    if head.preset == "ep" and head.num_heads not in (None, 1):
        raise MimbenchError(f"The ep head attends with one head, not head.num_heads={head.num_heads}.",
                            "Leave head.num_heads at 1 (or None) for ep.")
    if cfg.mode == "cached" and cfg.augment.mode != "rrc_flip":
        raise MimbenchError("mode='cached' trains on tokens of un-augmented images; augment.mode='timm' cannot apply.",
                            "Use mode='protocol' for augmented training, or leave augment.mode at 'rrc_flip'.")


def check_encoder(cfg, meta: dict, where: str) -> None:
    """Refuse an encoder (metadata ``meta``) that has no tokens of the kind the head attends to."""
    if cfg.head.tokens == "patch" and bool(cfg.head.final_norm) and pooled_final_norm(meta, where):
        raise MimbenchError(f"{where} has no normed patch tokens: its final norm acts on pooled features only (as "
                            f"EVA-02's), and the {cfg.head.preset} head attends to patch tokens after the final norm.",
                            "Set head.final_norm=False (the patch tokens as the last block outputs them), or use an "
                            "encoder whose final norm acts on every token.")


def probe_logits(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor, cfg) -> torch.Tensor:
    """Scores (N×C) of ``head`` on the frozen encoder's tokens of images ``x``, or on ``x`` itself when
    ``encoder_model`` is None (cached tokens)."""
    if encoder_model is not None:
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            x = encoder_tokens(encoder_model, x, tokens=cfg.head.tokens, final_norm=bool(cfg.head.final_norm),
                               block=attended_block(cfg.layers, len(encoder_model.blocks)))
    return head(x)


def _start(encoder: Path, config: Path, data: str, out: Path, overrides, layout: str, layers, select_on):
    """The run (overrides with ``--layers`` / ``--select-on`` added), its config checked against the encoder; the
    attended block. Everything refused here is refused before any work."""
    given = (("layers", layers), ("selection.on", select_on))
    overrides = [*overrides, *(format_override(k, v) for k, v in given if v is not None)]
    run = runner.start("attentive", encoder=encoder, config=config, data=data, out=out, overrides=overrides,
                       layout=layout)
    check_config(run.cfg)
    if select_on is not None and not run.cfg.selection.best_epoch:
        raise MimbenchError(f"--select-on {select_on}: this config reports the last epoch "
                            "(selection.best_epoch=False), so there is no epoch to select.",
                            "Leave --select-on out, or --set selection.best_epoch=True to report the best epoch.")
    meta = encoders.read_metadata(run.encoder, layout=layout)
    check_encoder(run.cfg, meta, str(run.encoder))
    return run, attended_block(run.cfg.layers, int(meta["depth"]))


def _scores(run, head: nn.Module, probe: Probe, score_fn, selection: EpochSelection | None, epochs: int):
    """(metrics, protocol.selection) of the trained ``head``: the last epoch's validation metrics, or, when the run
    selects its epoch, the selected epoch's (its kept weights loaded into ``head``) with the last epoch's beside."""
    workers = int(run.cfg.data.num_workers) if probe.encoder is not None else 0  # cached tokens: nothing to decode
    head.eval()
    last = runner.topk_metrics(*runner.score(run, score_fn, probe.val_set, probe.eval_batch, num_workers=workers))
    if selection is None:
        return last, {}
    if selection.best is None:
        raise MimbenchError("The run selects its best epoch but scored none.", "Train for at least one epoch.")
    chosen = last
    if int(selection.best["epoch"]) != epochs:
        head.load_state_dict(selection.best["state"])
        chosen = runner.topk_metrics(*runner.score(run, score_fn, probe.val_set, probe.eval_batch,
                                                   num_workers=workers))
    metrics = {**chosen, "best_epoch": int(selection.best["epoch"]), "last_epoch_top1": last["top1"],
               "last_epoch_top5": last["top5"]}
    return metrics, selection.record(epochs, last)


def run_attentive(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
                  resume: bool = False, layout: str = "auto", layers=None, select_on: str | None = None) -> dict:
    """Attentive probe of ``encoder`` on ``data`` with the protocol ``config``; the record is written to ``out``.
    ``layers`` / ``select_on`` (``--layers`` / ``--select-on``): the config's ``layers`` / ``selection.on`` for this
    run (None: the config's), added to the overrides."""
    run, block = _start(encoder, config, data, out, overrides, layout, layers, select_on)
    cfg, device = run.cfg, run.device
    batch, accum, eff, lr = runner.batch_rule(run, cfg.optim)
    size = int(cfg.img_size or encoders.read_metadata(run.encoder, layout=layout)["img_size"])
    model = _frozen_encoder(run, size)
    probe = (_cached_probe if cfg.mode == "cached" else _protocol_probe)(run, model, size, batch, accum)
    head = build_head(cfg.head.preset, int(model.embed_dim), len(probe.classes),
                      heads=int(cfg.head.num_heads or (1 if cfg.head.preset == "ep" else encoder_heads(model))),
                      num_queries=int(cfg.head.num_queries), mlp_ratio=float(cfg.head.mlp_ratio)).to(device)
    tokens = describe_tokens(model, tokens=cfg.head.tokens, final_norm=bool(cfg.head.final_norm), block=block)
    optimizer = build_optimizer(head, cfg.optim, lr)
    loop = runner.loop_config(run, accum, clip_grad=cfg.clip_grad)
    score_fn = under_autocast(lambda x: probe_logits(head, probe.encoder, x, cfg), run.precision, device)
    selection = None
    if cfg.selection.best_epoch:
        held = probe.holdout_set if probe.holdout_set is not None else probe.val_set
        selection = EpochSelection(run, head, score_fn, held, probe.eval_batch, on=str(cfg.selection.on),
                                   iters_per_epoch=len(probe.loader) // accum, resume=resume)

    def step(trained, batch_):
        x, y = batch_[0].to(device, non_blocking=True), batch_[1].to(device, non_blocking=True)
        return F.cross_entropy(probe_logits(trained, probe.encoder, x, cfg), y), {}

    def step_end(it: int, total: int) -> None:
        head.commit()
        cosine_weight_decay(optimizer, float(cfg.optim.weight_decay), cfg.optim.final_weight_decay, it, total)
        if selection is not None:
            selection.step_end(it)

    history = fit(head, optimizer, probe.loader, step, loop, run.out, resume=resume,
                  desc=f"attentive ({cfg.head.preset}, {cfg.mode})", on_step_end=step_end)
    metrics, selected = _scores(run, head, probe, score_fn, selection, int(loop.epochs))
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    return runner.finish(
        run,
        protocol={"mode": cfg.mode, "head_preset": cfg.head.preset, "head_params": parameter_count(head),
                  "tokens": tokens, "layers": str(cfg.layers), "block": block,
                  "num_queries": int(cfg.head.num_queries), "optimizer": str(cfg.optim.name),
                  "lr": lr, "eff_batch_size": eff, "accum_iter": accum, "epochs": loop.epochs,
                  "warmup_epochs": loop.warmup_epochs, **probe.transforms, "img_size": size,
                  "reported_epoch": "selected" if selection is not None else "last",
                  **({"selection": selected} if selected else {})},
        metrics=metrics, dataset={"sizes": {"train": probe.train_size, "val": len(probe.val_set),
                                            **({} if probe.holdout_set is None else
                                               {"holdout": len(probe.holdout_set)})},
                                  "skipped": probe.skipped})
