"""Linear probe of a frozen encoder (the MAE protocol, plus a fast variant on cached features).

Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` (weight trunc-normal std 0.01,
bias 0) on the class token after the encoder's final norm (``pool``/``--pool``: or the mean of the patch
tokens -- the default of encoders without class token, e.g. I-JEPA --, or both, width 2D; see
:func:`mimbench.evals.features.resolve_pool`; the record's ``protocol.feature`` says which). Only the linear layer has parameters; the
batch norm (no affine, running statistics) whitens features whose scale differs between encoders.

``mode="protocol"`` (facebookresearch/mae ``main_linprobe.py`` and the "Linear Probing" section of ``FINETUNE.md``): the encoder is
frozen and in eval mode; training images go through RandomResizedCrop(bicubic) + horizontal flip;
optimizer LARS (momentum 0.9, trust coefficient 0.001, weight decay 0; the weight matrix is
adapted, 1-D parameters are not); ``lr = blr * effective_batch / 256`` with the effective batch
reached by gradient accumulation (batch statistics of the BN are those of a micro-batch, as they
were per GPU in the reference); per-step warm-up + cosine schedule (``mimbench.engine``);
cross-entropy without smoothing; evaluation with Resize(int(S / (224/256)), bicubic; S above 224: no enlargement) + CenterCrop(S), as MAE.

``mode="cached"``: features of the un-augmented training images are extracted once (``features``),
and the same head is trained on them (LARS or Adam). This is much faster and is recorded as the
deviation "fast linear probe on cached features".

Metrics: top-1 / top-5 accuracy in percent on the ``val`` split.

Several processes (torchrun, Slurm): the global batch of every optimizer step, and its split into
micro-batches of ``optim.batch_size``, are the same on any number of processes
(:mod:`mimbench.batching`), so the batch norm normalises the same micro-batches as a 1-process run
with accumulation. Its running statistics are made identical on every rank, and equal to that
1-process run's: each micro-batch's mean and variance are kept until the optimizer step, then the
statistics of every micro-batch of every rank are gathered and applied, in global order (rank 0's
micro-batches first), as the momentum updates one process would have made one after the other
(:class:`StepBatchNorm1d`). The reference keeps per-GPU running statistics and averages the
per-GPU accuracies instead; averaging the statistics would depend on the number of processes,
replaying them does not. Validation is sharded (each image scored once) and gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn
from torchvision import transforms as T

from mimbench import dist, encoders
from mimbench.data import dataset_stats
from mimbench.engine import fit
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.features import FEATURE_READ, eval_transform, extract_features, limited, pool_tokens, resolve_pool
from mimbench.fastpath import under_autocast
from mimbench.schema import LINEAR_OPTIMIZERS

CACHED_DEVIATION = "fast linear probe on cached features"
#: Validation batch of the cached mode (feature vectors: large batches are cheap).
CACHED_EVAL_BATCH = 4096


class StepBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d(affine=False)`` whose running statistics are updated at the optimizer step.

    Training mode normalises with the micro-batch's statistics, as ``BatchNorm1d`` does, and keeps
    its mean and unbiased variance; :meth:`commit` (called once per optimizer step on every rank)
    gathers the kept statistics of all ranks and applies the momentum updates in global micro-batch
    order (rank ``r``'s ``k``-th micro-batch is number ``r * accum_iter + k``), the same updates, in
    the same order, as one process accumulating the same micro-batches. Buffers and state-dict keys
    are ``BatchNorm1d``'s.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False, track_running_stats=True)
        self._pending: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n = x.shape[0]
        if n < 2:
            raise MimbenchError("A batch-norm micro-batch has a single sample.", "Use optim.batch_size of 2 or more.")
        var, mean = torch.var_mean(x.detach().float(), dim=0, unbiased=False)
        self._pending.append(torch.stack([mean, var * (n / (n - 1))]))
        return F.batch_norm(x, None, None, training=True, momentum=0.0, eps=self.eps)

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the kept micro-batch statistics of every rank to the running statistics (collective)."""
        local = torch.stack(self._pending) if self._pending else self.running_mean.new_zeros(0, 2, self.num_features)
        self._pending.clear()
        for mean, var in dist.gather_rows(local):
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)
            self.num_batches_tracked += 1


def build_head(embed_dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(D, affine=False, eps=1e-6) (as :class:`StepBatchNorm1d`) + Linear(D, C),
    weight ~ trunc-normal(std 0.01), bias 0."""
    linear = nn.Linear(embed_dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(StepBatchNorm1d(embed_dim, eps=1e-6), linear)


def build_optimizer(head: nn.Module, optim, lr: float) -> torch.optim.Optimizer:
    """LARS as in MAE (matrices adapted, 1-D params plain momentum SGD) or Adam (``optim["name"]``); 1-D
    parameters without weight decay. ``optim``: a config's ``optim`` section (the keys its optimizer reads).

    timm's ``Lars`` adapts a parameter only when ``weight_decay != 0`` or ``always_adapt`` is set,
    so with weight decay 0 the weight matrix needs its own group with ``always_adapt=True``. ``eps=0``
    gives MAE's trust ratio ``trust_coeff * |w| / |g|`` exactly (timm guards zero norms itself).
    """
    name = str(optim["name"]).lower()
    if name not in LINEAR_OPTIMIZERS:
        raise MimbenchError(f"Unknown linear-probe optimizer {name!r}.", f"Use optim.name in {LINEAR_OPTIMIZERS}.")
    wd = float(optim["weight_decay"])
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    if name == "adam":
        return torch.optim.Adam([{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}],
                                lr=lr, betas=tuple(optim["betas"]))

    common = dict(lr=lr, momentum=float(optim["momentum"]), trust_coeff=float(optim["trust_coeff"]), eps=0.0,
                  trust_clip=False)
    return Lars([{"params": matrices, "weight_decay": wd, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}], **common)


def _train_transform(data: str, img_size: int, scale):
    mean, std = dataset_stats(data)
    scale = tuple(scale)
    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return transform, f"randomresizedcrop{img_size}(scale={scale},bicubic)/hflip/normalize(mean={mean},std={std})"


@dataclass
class Probe:
    """What a linear probe trains and scores: the head, the frozen encoder (None when the inputs are cached
    features), the training batches, the validation set, and what the record says about them."""

    head: nn.Module
    encoder: nn.Module | None
    loader: Any
    train_size: int
    val_set: Any
    eval_batch: int
    transforms: dict  # {"train_transform": ..., "val_transform": ...}
    skipped: dict
    pool: str = "cls"  # resolved pooling (mimbench.evals.features.pool_tokens)


def _cached_probe(run, size: int, batch: int, accum: int, pool: str) -> Probe:
    """Head on features of the un-augmented images, extracted once and cached (``features``); the batches are
    index arrays into the features on the device."""
    cfg, device = run.cfg, run.device
    if CACHED_DEVIATION not in run.deviations:
        run.deviations.insert(0, CACHED_DEVIATION)
    common = dict(cache_dir=Path(cfg.cache_dir or run.out / "feature_cache"), img_size=size,
                  batch_size=int(cfg.feature_batch_size), num_workers=int(cfg.data.num_workers), amp=run.amp,
                  max_bad_fraction=runner.max_bad_fraction(run), layout=run.layout, pool=pool)
    tx, ty, tinfo = extract_features(run.encoder, run.data, "train", limit=cfg.data.limit_train, **common)
    vx, vy, vinfo = extract_features(run.encoder, run.data, "val", limit=cfg.data.limit_val, **common)
    train_x, train_y = torch.from_numpy(np.array(tx)).to(device), torch.from_numpy(np.array(ty)).to(device)
    val_set = torch.utils.data.TensorDataset(torch.from_numpy(np.array(vx)), torch.from_numpy(np.array(vy)))
    return Probe(head=build_head(int(tx.shape[1]), len(tinfo["classes"])).to(device), encoder=None,
                 loader=runner.TensorBatches(run, train_x, train_y, batch, accum), train_size=len(train_x),
                 val_set=val_set, eval_batch=CACHED_EVAL_BATCH,
                 transforms={"train_transform": tinfo["transform"] + " (no augmentation)",
                             "val_transform": vinfo["transform"]},
                 skipped={"train": tinfo["skipped"], "val": vinfo["skipped"]}, pool=tinfo["pool"])


def _protocol_probe(run, size: int, batch: int, accum: int, pool: str) -> Probe:
    """Head on the frozen encoder (eval mode, no gradients) of augmented images: RandomResizedCrop + flip."""
    cfg = run.cfg
    encoder_model = encoders.load_encoder(run.encoder, img_size=size, layout=run.layout).to(run.device).eval()
    for p in encoder_model.parameters():
        p.requires_grad_(False)
    pool = resolve_pool(pool, encoder_model.mimbench_metadata, str(run.encoder))
    train_tf, train_desc = _train_transform(run.data, size, cfg.augment.scale)
    val_tf, val_desc = eval_transform(run.data, size)
    train_set = runner.build_split(run, "train", transform=train_tf, img_size=size)
    val_set = runner.build_split(run, "val", transform=val_tf, img_size=size)
    skipped = runner.skipped(train_set, val_set)
    classes = list(train_set.classes)
    train_set, val_set = limited(train_set, cfg.data.limit_train), limited(val_set, cfg.data.limit_val)
    width = encoder_model.embed_dim * (2 if pool == "cls+avg" else 1)
    return Probe(head=build_head(width, len(classes)).to(run.device), encoder=encoder_model,
                 loader=runner.train_loader(run, train_set, batch, accum, num_workers=int(cfg.data.num_workers)),
                 train_size=len(train_set), val_set=val_set, eval_batch=batch,
                 transforms={"train_transform": train_desc, "val_transform": val_desc}, skipped=skipped, pool=pool)


def run_linear(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
               resume: bool = False, layout: str = "auto", pool: str = "auto") -> dict:
    """Linear probe of ``encoder`` on ``data`` with the protocol ``config``; the record is written to ``out``.
    ``pool`` (``--pool``): which tokens the head reads (see the module docstring)."""
    run = runner.start("linear", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg, device = run.cfg, run.device
    batch, accum, eff, lr = runner.batch_rule(run, cfg.optim)
    size = int(cfg.img_size or encoders.read_metadata(run.encoder, layout=layout)["img_size"])
    build = _cached_probe if cfg.mode == "cached" else _protocol_probe
    probe = build(run, size, batch, accum, pool)
    optimizer = build_optimizer(probe.head, cfg.optim, lr)
    loop = runner.loop_config(run, accum)

    def step(head, batch_):
        x, y = batch_[0].to(device, non_blocking=True), batch_[1].to(device, non_blocking=True)
        return probe_loss(head, probe.encoder, x, y, probe.pool), {}

    history = fit(probe.head, optimizer, probe.loader, step, loop, run.out, resume=resume,
                  desc=f"linear ({cfg.mode})", on_step_end=lambda it, total: probe.head[0].commit())
    probe.head.eval()
    val_fn = under_autocast(lambda x: probe_logits(probe.head, probe.encoder, x, probe.pool), run.precision, device)  # as recorded
    logits, labels = runner.score(run, val_fn, probe.val_set,
                                  probe.eval_batch, num_workers=int(cfg.data.num_workers))
    metrics = runner.topk_metrics(logits, labels)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    return runner.finish(
        run,
        protocol={"mode": cfg.mode, "optimizer": str(cfg.optim.name), "lr": lr, "eff_batch_size": eff,
                  "accum_iter": accum, "epochs": loop.epochs, "warmup_epochs": loop.warmup_epochs,
                  **probe.transforms, "img_size": size, "feature": FEATURE_READ[probe.pool], "pool": probe.pool},
        metrics=metrics, dataset={"sizes": {"train": probe.train_size, "val": len(probe.val_set)},
                                  "skipped": probe.skipped})


def probe_logits(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Scores (N×C) of the probe ``head`` on the frozen encoder's features of images ``x`` (N×3×S×S; the class
    token, or the resolved ``pool``), or on ``x`` itself when ``encoder_model`` is None (cached features, N×D)."""
    if encoder_model is not None:
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            x = pool_tokens(encoder_model, encoder_model.forward_features(x), pool)
    return head(x.float())


def probe_loss(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
               pool: str = "cls") -> torch.Tensor:
    """Cross-entropy of :func:`probe_logits` against labels ``y`` (N): the linear probe's training loss."""
    return F.cross_entropy(probe_logits(head, encoder_model, x, pool), y)
