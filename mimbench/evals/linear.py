"""Linear probe of a frozen encoder (the MAE protocol, plus a fast variant on cached features).

Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` (weight trunc-normal std 0.01,
bias 0) on the class token after the encoder's final norm. Only the linear layer has parameters; the
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

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimbench import dist
from mimbench.errors import MimbenchError

CACHED_DEVIATION = "fast linear probe on cached features"
MODES = ("protocol", "cached")
OPTIMIZERS = ("lars", "adam")


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
    from timm.layers import trunc_normal_

    linear = nn.Linear(embed_dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(StepBatchNorm1d(embed_dim, eps=1e-6), linear)


def build_optimizer(head: nn.Module, optim: dict, lr: float) -> torch.optim.Optimizer:
    """LARS as in MAE (matrices adapted, 1-D params plain momentum SGD) or Adam; all without weight decay.

    timm's ``Lars`` adapts a parameter only when ``weight_decay != 0`` or ``always_adapt`` is set,
    so with weight decay 0 the weight matrix needs its own group with ``always_adapt=True``. ``eps=0``
    gives MAE's trust ratio ``trust_coeff * |w| / |g|`` exactly (timm guards zero norms itself).
    """
    name = str(optim.get("name", "lars")).lower()
    if name not in OPTIMIZERS:
        raise MimbenchError(f"Unknown linear-probe optimizer {name!r}.", f"Use optim.name in {OPTIMIZERS}.")
    wd = float(optim.get("weight_decay", 0.0))
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    if name == "adam":
        betas = tuple(optim.get("betas", (0.9, 0.999)))
        return torch.optim.Adam([{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}],
                                lr=lr, betas=betas)
    from timm.optim import Lars

    common = dict(lr=lr, momentum=float(optim.get("momentum", 0.9)),
                  trust_coeff=float(optim.get("trust_coeff", 0.001)), eps=0.0, trust_clip=False)
    return Lars([{"params": matrices, "weight_decay": wd, "always_adapt": True},
                 {"params": vectors, "weight_decay": 0.0, "always_adapt": False}], **common)


def _train_transform(data: str, img_size: int, aug: dict):
    from torchvision import transforms as T

    from mimbench.data import dataset_stats

    mean, std = dataset_stats(data)
    scale = tuple(aug.get("scale", (0.08, 1.0)))
    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return transform, f"randomresizedcrop{img_size}(scale={scale},bicubic)/hflip/normalize(mean={mean},std={std})"


def run_linear(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
               resume: bool = False, layout: str = "auto") -> dict:
    """Linear probe of ``encoder`` on ``data`` with the protocol ``config``; the record is written to ``out``."""
    from mimbench.encoders import load_encoder, read_metadata
    from mimbench.engine import fit
    from mimbench.evals import runner
    from mimbench.evals.features import eval_transform, extract_features, limited

    run = runner.start("linear", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg, device = run.cfg, run.device
    mode = cfg.get("mode", "protocol")
    if mode not in MODES:
        raise MimbenchError(f"Unknown linear-probe mode {mode!r}.", f"Use mode in {MODES}.")
    optim, sched, data_cfg = dict(cfg.optim), dict(cfg.schedule), dict(cfg.get("data", {}))
    batch, accum, eff, lr = runner.batch_rule(run, optim)
    size = int(cfg.get("img_size") or read_metadata(run.encoder, layout=layout)["img_size"])
    loop = runner.loop_config(run, sched, accum)
    num_workers = int(cfg.get("num_workers", 0))
    limit_train, limit_val = data_cfg.get("limit_train"), data_cfg.get("limit_val")

    if mode == "cached":
        if CACHED_DEVIATION not in run.deviations:
            run.deviations.insert(0, CACHED_DEVIATION)
        common = dict(cache_dir=Path(cfg.get("cache_dir") or run.out / "feature_cache"), img_size=size,
                      batch_size=int(cfg.get("feature_batch_size", 256)), num_workers=num_workers,
                      amp=run.amp, max_bad_fraction=runner.max_bad_fraction(run), layout=layout)
        tx, ty, tinfo = extract_features(run.encoder, data, "train", limit=limit_train, **common)
        vx, vy, vinfo = extract_features(run.encoder, data, "val", limit=limit_val, **common)
        classes = tinfo["classes"]
        train_set = torch.utils.data.TensorDataset(torch.from_numpy(np.array(tx)).to(device),
                                                   torch.from_numpy(np.array(ty)).to(device))
        val_set = torch.utils.data.TensorDataset(torch.from_numpy(np.array(vx)), torch.from_numpy(np.array(vy)))
        loader = runner.TensorBatches(run, *train_set.tensors, batch, accum)
        head = build_head(int(tx.shape[1]), len(classes)).to(device)
        encoder_model = None
        train_desc, val_desc = tinfo["transform"] + " (no augmentation)", vinfo["transform"]
        eval_batch = 4096
        skipped = {"train": tinfo["skipped"], "val": vinfo["skipped"]}
    else:
        encoder_model = load_encoder(run.encoder, img_size=size, layout=layout).to(device).eval()
        for p in encoder_model.parameters():
            p.requires_grad_(False)
        train_tf, train_desc = _train_transform(data, size, dict(cfg.get("augment", {})))
        val_tf, val_desc = eval_transform(data, size)
        train_set = runner.build_split(run, "train", transform=train_tf, img_size=size)
        val_set = runner.build_split(run, "val", transform=val_tf, img_size=size)
        skipped = runner.skipped(train_set, val_set)
        classes = list(train_set.classes)
        train_set, val_set = limited(train_set, limit_train), limited(val_set, limit_val)
        head = build_head(encoder_model.embed_dim, len(classes)).to(device)
        eval_batch = batch
        loader = runner.train_loader(run, train_set, batch, accum, num_workers=num_workers)
    sizes = {"train": len(train_set), "val": len(val_set)}
    optimizer = build_optimizer(head, optim, lr)

    def features(x: torch.Tensor) -> torch.Tensor:
        if encoder_model is None:
            return x
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            return encoder_model.forward_features(x)[:, 0]

    def step(model, batch_):
        x, y = batch_[0].to(device, non_blocking=True), batch_[1].to(device, non_blocking=True)
        logits = model(features(x).float())
        return F.cross_entropy(logits, y), {}

    history = fit(head, optimizer, loader, step, loop, run.out, resume=resume, desc=f"linear ({mode})",
                  on_step_end=lambda it, total: head[0].commit())
    head.eval()
    logits, labels = runner.score(run, lambda x: head(features(x).float()), val_set, eval_batch,
                                  num_workers=num_workers)
    metrics = runner.topk_metrics(logits, labels)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    return runner.finish(
        run,
        protocol={"mode": mode, "optimizer": str(optim.get("name", "lars")), "lr": lr, "eff_batch_size": eff,
                  "accum_iter": accum, "epochs": loop.epochs, "warmup_epochs": loop.warmup_epochs,
                  "train_transform": train_desc, "val_transform": val_desc, "img_size": size},
        metrics=metrics, dataset={"sizes": sizes, "skipped": skipped})


def probe_loss(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the probe ``head`` on the frozen encoder's class tokens of images ``x`` (N×3×S×S), or on
    ``x`` itself when ``encoder_model`` is None (cached features, N×D); ``y``: labels (N)."""
    if encoder_model is not None:
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            x = encoder_model.forward_features(x)[:, 0]
    return F.cross_entropy(head(x.float()), y)
