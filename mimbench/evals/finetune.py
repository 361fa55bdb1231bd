"""End-to-end fine-tuning of an encoder (the MAE protocol: facebookresearch/mae FINETUNE.md, main_finetune.py).

Model: timm ``VisionTransformer`` from the encoder file with global average pooling of the patch tokens
and ``fc_norm`` (the per-token final norm is dropped, fc_norm starts fresh), stochastic depth
``drop_path``, and a new linear head (weight trunc-normal std 2e-5, bias 0).
Optimizer: AdamW betas (0.9, 0.999), weight decay 0.05 except 1-D parameters, ``pos_embed`` and
``cls_token``; layer-wise lr decay from timm's ``param_groups_layer_decay`` (embeddings -> layer 0,
block i -> i + 1, final norm / head -> depth + 1; scale = decay ** (depth + 1 - layer)).
lr = blr * effective batch / 256; per-step warm-up then cosine to ``min_lr`` (``mimbench.engine``).
Loss: timm ``Mixup`` (mixup 0.8, cutmix 1.0, switch 0.5, label smoothing 0.1) with
``SoftTargetCrossEntropy``.
Augmentation (``augment.mode``): ``"timm"`` = timm ``create_transform`` (RandomResizedCrop bicubic,
flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 pixel mode, 1 box), as the reference;
``"tensor"`` = a cheap subset on batched tensors (horizontal flip + timm ``RandomErasing``) for the
built-in data's fast path -- recorded as a deviation.
Metrics: top-1 / top-5 accuracy in percent on ``val`` (Resize int(S / (224/256)) bicubic, S above 224 unchanged, + CenterCrop S).

Several processes: every optimizer step holds the same images on any number of processes, each
image's crop / flip / RandAugment / erasing is drawn from ``(seed, epoch, image index)``, and the
per-batch draws (Mixup/CutMix, stochastic depth, tensor-mode flip and erasing) from the global
generators seeded by ``(seed, epoch, first image of the micro-batch)`` - the micro-batches are the
same chunks on any number of processes (:mod:`mimbench.batching`). What remains different is the
floating-point summation order of the gradient (DDP all-reduce vs accumulation), which the
training amplifies over steps. Validation is sharded (each image scored once) and gathered.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimbench.errors import MimbenchError

AUG_MODES = ("timm", "tensor")


def build_model(encoder: Path, num_classes: int, *, img_size: int | None, drop_path: float,
                head_init_std: float = 2e-5, layout: str = "auto") -> torch.nn.Module:
    """Encoder as a timm ViT with avg pooling + fc_norm, drop path and a fresh head (trunc-normal ``head_init_std``)."""
    from timm.layers import trunc_normal_

    from mimbench.encoders import load_encoder

    model = load_encoder(encoder, img_size=img_size, global_pool="avg", fc_norm=True,
                         drop_path_rate=float(drop_path), num_classes=int(num_classes), layout=layout)
    trunc_normal_(model.head.weight, std=head_init_std)
    torch.nn.init.zeros_(model.head.bias)
    return model


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, layer_decay: float,
                    betas=(0.9, 0.999), fast: bool = True) -> torch.optim.AdamW:
    """AdamW over the layer-decay param groups of the model's encoder family (each with ``lr_scale``, applied
    by the scheduler; :attr:`mimbench.encoders.Family.layer_decay_groups`); ``fast``: the device's multi-tensor
    implementation (:func:`mimbench.fastpath.adamw_kwargs`)."""
    from mimbench.encoders import family_of_model
    from mimbench.fastpath import adamw_kwargs

    groups = family_of_model(model).layer_decay_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    impl = adamw_kwargs(next(model.parameters()).device) if fast else {"foreach": False}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **impl)


def _train_transform(data: str, img_size: int, aug: dict):
    from mimbench.data import dataset_stats
    from mimbench.data.transforms import finetune_train_transform

    mean, std = dataset_stats(data)
    return finetune_train_transform(img_size=img_size, mean=mean, std=std,
                                    auto_augment=aug.get("auto_augment", "rand-m9-mstd0.5-inc1"),
                                    re_prob=float(aug.get("re_prob", 0.25)), re_mode=aug.get("re_mode", "pixel"),
                                    re_count=int(aug.get("re_count", 1)))


def run_finetune(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
                 resume: bool = False, layout: str = "auto") -> dict:
    """Fine-tune ``encoder`` on ``data`` with protocol ``config``; the record is written to ``out``."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy

    from mimbench.batching import seed_batch
    from mimbench.data import is_builtin
    from mimbench.encoders import read_metadata
    from mimbench.engine import fit
    from mimbench.evals import runner
    from mimbench.evals.features import eval_transform, limited

    run = runner.start("finetune", encoder=encoder, config=config, data=data, out=out, overrides=overrides,
                       layout=layout)
    cfg, device = run.cfg, run.device
    optim, sched, aug = dict(cfg.optim), dict(cfg.schedule), dict(cfg.augment)
    data_cfg = dict(cfg.get("data", {}))
    mode = aug.get("mode", "timm")
    if mode not in AUG_MODES:
        raise MimbenchError(f"Unknown augmentation mode {mode!r}.", f"Use augment.mode in {AUG_MODES}.")
    if mode == "tensor" and not is_builtin(data):
        raise MimbenchError("augment.mode='tensor' works on the built-in data's tensor path only.",
                            "Use augment.mode='timm' (the protocol) for image folders.")
    batch, accum, eff, lr = runner.batch_rule(run, optim)
    if batch % 2:
        raise MimbenchError(f"optim.batch_size={batch} is odd; timm Mixup needs an even batch.",
                            "Use an even batch size.")
    size = int(cfg.get("img_size") or read_metadata(run.encoder, layout=layout)["img_size"])
    num_workers = int(cfg.get("num_workers", 0))

    if mode == "timm":
        train_tf, train_desc = _train_transform(data, size, aug)
    else:
        train_tf, train_desc = None, f"builtin tensor path + hflip + RandomErasing({aug.get('re_prob', 0.25)}, pixel)"
        dev = "augmentation: horizontal flip + random erasing on tensors only (no RandomResizedCrop, no RandAugment)"
        if dev not in run.deviations:
            run.deviations.append(dev)
    val_tf, val_desc = eval_transform(data, size)
    train_set = limited(runner.build_split(run, "train", transform=train_tf, img_size=size), data_cfg.get("limit_train"))
    full_val = runner.build_split(run, "val", transform=val_tf, img_size=size)
    val_set, classes = limited(full_val, data_cfg.get("limit_val")), full_val.classes
    loader = runner.train_loader(run, train_set, batch, accum, num_workers=num_workers)
    sampler = loader.batch_sampler

    model = build_model(run.encoder, len(classes), img_size=size, drop_path=float(cfg.model.drop_path),
                        head_init_std=float(cfg.model.get("head_init_std", 2e-5)), layout=layout).to(device)
    optimizer = build_optimizer(model, lr=lr, weight_decay=float(optim["weight_decay"]),
                                layer_decay=float(optim["layer_decay"]), betas=optim.get("betas", (0.9, 0.999)))
    mix = dict(cfg.mixup)
    mixup = Mixup(mixup_alpha=float(mix["mixup"]), cutmix_alpha=float(mix["cutmix"]),
                  prob=float(mix.get("prob", 1.0)), switch_prob=float(mix.get("switch_prob", 0.5)),
                  mode=mix.get("mode", "batch"), label_smoothing=float(mix["smoothing"]), num_classes=len(classes))
    criterion = SoftTargetCrossEntropy()
    erasing = RandomErasing(probability=float(aug.get("re_prob", 0.25)), mode=aug.get("re_mode", "pixel"),
                            max_count=int(aug.get("re_count", 1)), device=str(device)) if mode == "tensor" else None

    def step(m, batch_):
        x, y, idx = batch_
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seed_batch(run.seed, sampler.epoch, idx)  # per-batch draws: a function of the micro-batch, not the rank
        if erasing is not None:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            x = erasing(x)
        x, soft = mixup(x, y)
        return criterion(m(x), soft), {}

    loop = runner.loop_config(run, sched, accum, min_lr=1e-6, clip_grad=cfg.get("clip_grad"))
    history = fit(model, optimizer, loader, step, loop, run.out, resume=resume, desc="finetune")
    model.eval()
    logits, labels = runner.score(run, model, val_set, batch, num_workers=num_workers)
    metrics = runner.topk_metrics(logits, labels)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    return runner.finish(
        run,
        protocol={"lr": lr, "eff_batch_size": eff, "accum_iter": accum, "epochs": loop.epochs,
                  "warmup_epochs": loop.warmup_epochs, "layer_decay": float(optim["layer_decay"]),
                  "drop_path": float(cfg.model.drop_path), "train_transform": train_desc,
                  "val_transform": val_desc, "img_size": size},
        metrics=metrics, dataset={"sizes": {"train": len(train_set), "val": len(val_set)},
                                  "skipped": runner.skipped(train_set, val_set)})


def build_mixup(mix, num_classes: int):
    """``(mixup, criterion)`` of the protocol from a config's ``mixup`` section: timm ``Mixup`` (Mixup/CutMix and
    label smoothing, soft targets) and ``SoftTargetCrossEntropy``."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mixup = Mixup(mixup_alpha=float(mix["mixup"]), cutmix_alpha=float(mix["cutmix"]), prob=float(mix["prob"]),
                  switch_prob=float(mix["switch_prob"]), mode=mix["mode"], label_smoothing=float(mix["smoothing"]),
                  num_classes=int(num_classes))
    return mixup, SoftTargetCrossEntropy()


def mixup_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mixup, criterion) -> torch.Tensor:
    """The fine-tuning loss of images ``x`` (N×3×S×S, N even) with labels ``y`` (N): mixed inputs, soft targets."""
    x, soft = mixup(x, y)
    return criterion(model(x), soft)
