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
cross-entropy without smoothing; evaluation with Resize(S/0.875, bicubic) + CenterCrop(S).

``mode="cached"``: features of the un-augmented training images are extracted once (``features``),
and the same head is trained on them (LARS or Adam). This is much faster and is recorded as the
deviation "fast linear probe on cached features".

Metrics: top-1 / top-5 accuracy in percent on the ``val`` split.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimbench.errors import MimbenchError

CACHED_DEVIATION = "fast linear probe on cached features"
MODES = ("protocol", "cached")
OPTIMIZERS = ("lars", "adam")


def build_head(embed_dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(D, affine=False, eps=1e-6) + Linear(D, C), weight ~ trunc-normal(std 0.01), bias 0."""
    from timm.layers import trunc_normal_

    linear = nn.Linear(embed_dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)


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


class FeatureBatches:
    """Shuffled mini-batches of in-memory features: ``(x B×D, y B)``; order = f(seed, epoch), last partial batch dropped.

    Under torchrun each rank takes every ``world``-th sample of the epoch's permutation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.x, self.y, self.batch_size, self.seed, self.rank, self.world = x, y, int(batch_size), seed, rank, world
        self.per_rank = len(x) // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.x), generator=g)[self.rank::self.world][: self.per_rank].to(self.x.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def _accumulation(optim: dict, world: int) -> tuple[int, int, int]:
    """(micro batch per process, accum_iter, effective batch) from ``optim.batch_size`` / ``eff_batch_size``."""
    batch = int(optim["batch_size"])
    eff = optim.get("eff_batch_size")
    if eff is None:
        return batch, int(optim.get("accum_iter", 1)), batch * int(optim.get("accum_iter", 1)) * world
    eff = int(eff)
    if eff % (batch * world):
        raise MimbenchError(f"Effective batch {eff} is not a multiple of batch_size {batch} x {world} processes.",
                            "Choose optim.batch_size (per process) dividing optim.eff_batch_size / world size.")
    return batch, eff // (batch * world), eff


@torch.no_grad()
def _scores(fn, batches) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for x, y in batches:
        logits.append(fn(x).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(logits), torch.cat(labels)


def _topk(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from mimbench.evals.knn import topk_accuracy

    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": acc[1], "top5": acc[5]}


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
               resume: bool = False) -> dict:
    """Linear probe of ``encoder`` on ``data`` with the protocol ``config``; the record is written to ``out``."""
    from mimbench.config import config_sha256, load_config
    from mimbench.data import build_dataset
    from mimbench.encoders import check_encoder_file, load_encoder, read_metadata
    from mimbench.engine import LoopConfig, dist_info, fit, seed_everything
    from mimbench.evals.features import eval_transform, extract_features, limited
    from mimbench.fastpath import resolve_amp
    from mimbench.results.records import encoder_summary, new_record, write_record

    started = time.time()
    encoder, out = Path(encoder), Path(out)
    check_encoder_file(encoder)
    cfg = load_config(config, overrides)
    mode = cfg.get("mode", "protocol")
    if mode not in MODES:
        raise MimbenchError(f"Unknown linear-probe mode {mode!r}.", f"Use mode in {MODES}.")
    optim, sched, data_cfg = dict(cfg.optim), dict(cfg.schedule), dict(cfg.get("data", {}))
    rank, world, _ = dist_info()
    batch, accum, eff = _accumulation(optim, world)
    lr = float(optim["lr"]) if optim.get("lr") is not None else float(optim["blr"]) * eff / 256
    seed = int(cfg.get("seed", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = int(cfg.get("img_size") or read_metadata(encoder)["img_size"])
    loop = LoopConfig(epochs=int(sched["epochs"]), warmup_epochs=float(sched["warmup_epochs"]),
                      min_lr=float(sched.get("min_lr", 0.0)), accum_iter=accum, amp=cfg.get("amp", "auto"),
                      ckpt_every=int(cfg.get("ckpt_every", 0)), seed=seed, log_every=int(cfg.get("log_every", 20)),
                      progress=bool(cfg.get("progress", True)))
    deviations = list(cfg.get("deviations", []))
    num_workers = int(cfg.get("num_workers", 0))
    limit_train, limit_val = data_cfg.get("limit_train"), data_cfg.get("limit_val")

    seed_everything(seed)  # head initialisation (and all later randomness) follows the recorded seed
    if mode == "cached":
        if CACHED_DEVIATION not in deviations:
            deviations.insert(0, CACHED_DEVIATION)
        common = dict(cache_dir=Path(cfg.get("cache_dir") or out / "feature_cache"), img_size=size,
                      batch_size=int(cfg.get("feature_batch_size", 256)), num_workers=num_workers,
                      amp=str(loop.amp))
        tx, ty, tinfo = extract_features(encoder, data, "train", limit=limit_train, **common)
        vx, vy, vinfo = extract_features(encoder, data, "val", limit=limit_val, **common)
        classes = tinfo["classes"]
        head = build_head(int(tx.shape[1]), len(classes)).to(device)
        train_x = torch.from_numpy(np.asarray(tx)).to(device)
        train_y = torch.from_numpy(np.asarray(ty)).to(device)
        loader = FeatureBatches(train_x, train_y, batch, seed, rank, world)
        encoder_model = None
        train_desc, val_desc = tinfo["transform"] + " (no augmentation)", vinfo["transform"]
        sizes = {"train": int(len(ty)), "val": int(len(vy))}
    else:
        encoder_model = load_encoder(encoder, img_size=size).to(device).eval()
        for p in encoder_model.parameters():
            p.requires_grad_(False)
        train_tf, train_desc = _train_transform(data, size, dict(cfg.get("augment", {})))
        val_tf, val_desc = eval_transform(data, size)
        train_set = build_dataset(data, "train", transform=train_tf, img_size=size)
        val_set = build_dataset(data, "val", transform=val_tf, img_size=size)
        classes = list(train_set.classes)
        train_set, val_set = limited(train_set, limit_train), limited(val_set, limit_val)
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=seed)
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                                             num_workers=num_workers, pin_memory=device.type == "cuda",
                                             drop_last=True, persistent_workers=num_workers > 0)
        head = build_head(encoder_model.embed_dim, len(classes)).to(device)
        sizes = {"train": len(train_set), "val": len(val_set)}
    optimizer = build_optimizer(head, optim, lr)

    def features(x: torch.Tensor) -> torch.Tensor:
        if encoder_model is None:
            return x
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            return encoder_model.forward_features(x)[:, 0]

    def step(model, batch_):
        x, y = batch_
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(features(x).float())
        return F.cross_entropy(logits, y), {}

    history = fit(head, optimizer, loader, step, loop, out, resume=resume, desc=f"linear ({mode})")
    head.eval()
    if encoder_model is None:
        val_x = torch.from_numpy(np.asarray(vx)).to(device)
        chunks = [(val_x[i:i + 4096], torch.from_numpy(np.asarray(vy[i:i + 4096]))) for i in range(0, len(val_x), 4096)]
        logits, labels = _scores(head, chunks)
    else:
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=num_workers)
        logits, labels = _scores(lambda x: head(features(x.to(device)).float()), val_loader)
    metrics = _topk(logits, labels)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    finished = time.time()
    record = new_record(
        "linear",
        protocol={"name": Path(config).stem, "sha256": config_sha256(cfg), "config": str(config),
                  "overrides": list(overrides), "deviations": deviations, "mode": mode,
                  "optimizer": str(optim.get("name", "lars")), "lr": lr, "eff_batch_size": eff,
                  "accum_iter": accum, "epochs": loop.epochs, "warmup_epochs": loop.warmup_epochs,
                  "train_transform": train_desc, "val_transform": val_desc, "img_size": size},
        encoder=encoder_summary(encoder),
        dataset={"name": data, "root": None if data.startswith("builtin:") else str(Path(data).resolve()),
                 "sizes": sizes},
        metrics=metrics,
        seed=seed,
        started=started,
        finished=finished,
        precision=resolve_amp(str(loop.amp), device),
    )
    if rank == 0:
        write_record(out, record)
    return record
