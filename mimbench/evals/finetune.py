"""End-to-end fine-tuning of an encoder (the MAE protocol: facebookresearch/mae FINETUNE.md, main_finetune.py).

Model: timm ``VisionTransformer`` from the encoder file with global average pooling of the patch tokens
and ``fc_norm`` (the per-token final norm is dropped, fc_norm starts fresh), stochastic depth
``model.drop_path``, and a new linear head (weight trunc-normal std ``model.head_init_std``, bias 0).
Optimizer: AdamW, weight decay except 1-D parameters, ``pos_embed`` and ``cls_token``; layer-wise lr decay
from the encoder family's groups (embeddings -> layer 0, block i -> i + 1, final norm / head -> depth + 1;
scale = decay ** (depth + 1 - layer)). lr = blr * effective batch / 256; per-step warm-up then cosine to
``schedule.min_lr`` (``mimbench.engine``).
Loss: timm ``Mixup`` (the ``mixup`` section: Mixup/CutMix, switch probability, label smoothing) with
``SoftTargetCrossEntropy`` (:func:`build_mixup`, :func:`mixup_loss`).
Augmentation (``augment.mode``): ``"timm"`` = timm ``create_transform`` (RandomResizedCrop bicubic, flip,
RandAugment ``augment.auto_augment``, random erasing ``augment.re_*``), as the reference; ``"tensor"`` = a
cheap subset on batched tensors (horizontal flip + timm ``RandomErasing``) for the built-in data's fast path --
recorded as a deviation. The protocol's values: ``eval_configs/finetune/mae_vit-b_in1k.py``; the defaults of
keys a config leaves out: :mod:`mimbench.schema`.
Metrics: top-1 / top-5 accuracy in percent on ``val`` (Resize int(S / (224/256)) bicubic, S above 224 unchanged, + CenterCrop S).

Partial fine-tuning (MAE section 4.3, Figure 9; ``finetune.trainable_blocks``, :func:`freeze_for_partial_finetune`):
the same recipe with part of the encoder frozen (``requires_grad=False``, left out of the optimizer). ``"all"``
(the default) trains everything. An integer K trains the last K blocks and what runs after the blocks -- the final
norm (``fc_norm`` under avg pooling, else ``norm``) and the head; the patch embedding, position embedding, class
token, registers, any shared relative-position bias and the first depth - K blocks are frozen (K = 0: a linear head
on frozen features through the fine-tune recipe -- the final norm's affine part folds into the head, so it stays a
linear classifier; K = depth: every block, embeddings still frozen). ``"mlp"`` trains only the last block's MLP half
(``norm2``, ``mlp`` and the MLP branch's layer scale where the family has one) besides the final norm and the head:
MAE's appendix tunes "the last block's MLP and its norm"; the final norm and head train at every point of the sweep,
this one included. Layer decay keeps the full model's numbering over what trains (the last block's lr scale is
``layer_decay`` as in full fine-tuning), and the recipe's drop path still acts on every block. The record gives
``trainable_blocks`` and the numbers of trained and of all parameters.

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
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy

from mimbench import dist, encoders
from mimbench.batching import seed_batch
from mimbench.data import dataset_stats, is_builtin
from mimbench.data.transforms import finetune_train_transform
from mimbench.engine import fit
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.classifier import MODEL_FILE, save_classifier
from mimbench.evals.features import eval_transform, limited
from mimbench.fastpath import adamw_kwargs, under_autocast
from mimbench.schema import TRAINABLE_BLOCKS_WORDS, spec_of

#: The schema's defaults of the head's init std and AdamW's betas (keyword defaults of the builders below).
HEAD_INIT_STD, BETAS = spec_of("finetune", "model.head_init_std").default, spec_of("finetune", "optim.betas").default
#: What the head reads (timm ``global_pool="avg"``: the patch tokens after the class token and any registers).
FINETUNE_FEATURE = "mean of the patch tokens (class and register tokens excluded) -> fresh fc_norm"
#: The deviation recorded by ``augment.mode="tensor"``.
TENSOR_DEVIATION = ("augmentation: horizontal flip + random erasing on tensors only (no RandomResizedCrop, "
                    "no RandAugment)")


def build_model(encoder: Path, num_classes: int, *, img_size: int | None, drop_path: float,
                head_init_std: float = HEAD_INIT_STD, layout: str = "auto") -> torch.nn.Module:
    """Encoder as a timm ViT with avg pooling + fc_norm, drop path and a fresh head (trunc-normal ``head_init_std``)."""
    model = encoders.load_encoder(encoder, img_size=img_size, global_pool="avg", fc_norm=True,
                                  drop_path_rate=float(drop_path), num_classes=int(num_classes), layout=layout)
    trunc_normal_(model.head.weight, std=head_init_std)
    torch.nn.init.zeros_(model.head.bias)
    return model


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, layer_decay: float,
                    betas=BETAS, fast: bool = True) -> torch.optim.AdamW:
    """AdamW over the layer-decay param groups of the model's encoder family (each with ``lr_scale``, applied
    by the scheduler; :attr:`mimbench.encoders.Family.layer_decay_groups`); ``fast``: the device's multi-tensor
    implementation (:func:`mimbench.fastpath.adamw_kwargs`)."""
    groups = encoders.family_of_model(model).layer_decay_groups(model, weight_decay=weight_decay,
                                                                layer_decay=layer_decay)
    impl = adamw_kwargs(next(model.parameters()).device) if fast else {"foreach": False}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **impl)


#: The parts of a block its MLP half holds (``trainable_blocks="mlp"``): the norm before the MLP, the MLP and the MLP
#: branch's layer scale where the family has one (timm ViT ``ls2``, Beit and Eva ``gamma_2``; MAE's ViT has none).
MLP_HALF = ("norm2", "mlp", "ls2", "gamma_2")


def _after_blocks(model: torch.nn.Module) -> set[str]:
    """The top-level modules a timm ViT-family model runs after its blocks (final norm, pooling, head)."""
    names = [name for name, _ in model.named_children()]
    return set(names[names.index("blocks") + 1:])


def check_trainable_blocks(trainable_blocks: int | str, depth: int) -> None:
    """MimbenchError unless ``trainable_blocks`` is a word of :data:`~mimbench.schema.TRAINABLE_BLOCKS_WORDS` or an
    integer from 0 to ``depth``."""
    if trainable_blocks in TRAINABLE_BLOCKS_WORDS and isinstance(trainable_blocks, str):
        return
    if isinstance(trainable_blocks, bool) or not isinstance(trainable_blocks, int) or not 0 <= trainable_blocks <= depth:
        raise MimbenchError(f"finetune.trainable_blocks={trainable_blocks!r} does not fit this {depth}-block encoder.",
                            f"Use an integer from 0 to {depth} (the last K blocks) or one of "
                            f"{', '.join(TRAINABLE_BLOCKS_WORDS)}.")


def trainable_parameter_names(model: torch.nn.Module, trainable_blocks: int | str) -> list[str]:
    """The names of the parameters that train under ``trainable_blocks`` (module docstring: an integer K = the last K
    blocks, ``"mlp"`` = the last block's :data:`MLP_HALF`, ``"all"``), plus the final norm and head in every case.

    Raises MimbenchError for a K above the model's depth or a word it does not know."""
    named = [name for name, _ in model.named_parameters()]
    if trainable_blocks == "all":
        return named
    depth = len(model.blocks)
    check_trainable_blocks(trainable_blocks, depth)
    mlp = trainable_blocks == "mlp"
    first = depth - 1 if mlp else depth - trainable_blocks
    after = _after_blocks(model)
    kept = []
    for name in named:
        top, _, rest = name.partition(".")
        if top == "blocks":
            index, _, part = rest.partition(".")
            if int(index) >= first and (not mlp or part.split(".")[0] in MLP_HALF):
                kept.append(name)
        elif top in after:
            kept.append(name)
    return kept


def freeze_for_partial_finetune(model: torch.nn.Module, trainable_blocks: int | str) -> dict:
    """Set ``requires_grad`` by :func:`trainable_parameter_names`; returns ``{"trainable_blocks", "trained_params",
    "total_params"}`` (parameter counts in elements) for the record."""
    keep = set(trainable_parameter_names(model, trainable_blocks))
    trained = total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
        total += param.numel()
        trained += param.numel() if name in keep else 0
    return {"trainable_blocks": trainable_blocks, "trained_params": trained, "total_params": total}


def build_mixup(mix, num_classes: int):
    """``(mixup, criterion)`` of the protocol from a config's ``mixup`` section: timm ``Mixup`` (Mixup/CutMix and
    label smoothing, soft targets) and ``SoftTargetCrossEntropy``."""
    mixup = Mixup(mixup_alpha=float(mix["mixup"]), cutmix_alpha=float(mix["cutmix"]), prob=float(mix["prob"]),
                  switch_prob=float(mix["switch_prob"]), mode=mix["mode"], label_smoothing=float(mix["smoothing"]),
                  num_classes=int(num_classes))
    return mixup, SoftTargetCrossEntropy()


def mixup_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mixup, criterion) -> torch.Tensor:
    """The fine-tuning loss of images ``x`` (N×3×S×S, N even) with labels ``y`` (N): mixed inputs, soft targets."""
    x, soft = mixup(x, y)
    return criterion(model(x), soft)


def _augmentation(run, size: int):
    """``(per-image transform or None, its description, batch eraser or None)`` of ``augment.mode``: timm's
    ``create_transform`` per image (the protocol), or flip + random erasing on batched tensors (``tensor``,
    built-in data only, recorded as a deviation)."""
    aug = run.cfg.augment
    if aug.mode == "timm":
        mean, std = dataset_stats(run.data)
        transform, description = finetune_train_transform(
            img_size=size, mean=mean, std=std, auto_augment=aug.auto_augment, re_prob=float(aug.re_prob),
            re_mode=aug.re_mode, re_count=int(aug.re_count))
        return transform, description, None
    if not is_builtin(run.data):
        raise MimbenchError("augment.mode='tensor' works on the built-in data's tensor path only.",
                            "Use augment.mode='timm' (the protocol) for image folders.")
    if TENSOR_DEVIATION not in run.deviations:
        run.deviations.append(TENSOR_DEVIATION)
    eraser = RandomErasing(probability=float(aug.re_prob), mode=aug.re_mode, max_count=int(aug.re_count),
                           device=str(run.device))
    return None, f"builtin tensor path + hflip + RandomErasing({aug.re_prob}, {aug.re_mode})", eraser


def _splits(run, size: int, train_tf):
    """``(train, val, classes, val transform description)``: the splits at ``size`` (broken files skipped), cut
    to ``data.limit_train`` / ``data.limit_val``."""
    val_tf, val_desc = eval_transform(run.data, size)
    train = runner.build_split(run, "train", transform=train_tf, img_size=size)
    full_val = runner.build_split(run, "val", transform=val_tf, img_size=size)
    return (limited(train, run.cfg.data.limit_train), limited(full_val, run.cfg.data.limit_val), full_val.classes,
            val_desc)


def _make_step(run, sampler, mixup, criterion, eraser):
    """The loop's step: the micro-batch's draws seeded from its images (not the rank), the tensor-mode flip and
    erasing when ``eraser`` is given, then :func:`mixup_loss`."""
    device = run.device

    def step(model, batch):
        x, y, idx = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seed_batch(run.seed, sampler.epoch, idx)  # per-batch draws: a function of the micro-batch, not the rank
        if eraser is not None:
            flip = torch.rand(x.shape[0], device=device) < 0.5
            x = eraser(torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x))
        return mixup_loss(model, x, y, mixup, criterion), {}

    return step


def run_finetune(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
                 resume: bool = False, layout: str = "auto") -> dict:
    """Fine-tune ``encoder`` on ``data`` with protocol ``config``; the record is written to ``out``."""
    run = runner.start("finetune", encoder=encoder, config=config, data=data, out=out, overrides=overrides,
                       layout=layout)
    cfg, optim = run.cfg, run.cfg.optim
    batch, accum, eff, lr = runner.batch_rule(run, optim)
    if batch % 2:
        raise MimbenchError(f"optim.batch_size={batch} is odd; timm Mixup needs an even batch.",
                            "Use an even batch size.")
    meta = encoders.read_metadata(run.encoder, layout=layout)
    size = int(cfg.img_size or meta["img_size"])
    check_trainable_blocks(cfg.finetune.trainable_blocks, int(meta["depth"]))  # refused before any training
    train_tf, train_desc, eraser = _augmentation(run, size)
    train_set, val_set, classes, val_desc = _splits(run, size, train_tf)
    loader = runner.train_loader(run, train_set, batch, accum, num_workers=int(cfg.data.num_workers))
    model = build_model(run.encoder, len(classes), img_size=size, drop_path=float(cfg.model.drop_path),
                        head_init_std=float(cfg.model.head_init_std), layout=layout).to(run.device)
    partial = freeze_for_partial_finetune(model, cfg.finetune.trainable_blocks)  # before the optimizer takes them
    optimizer = build_optimizer(model, lr=lr, weight_decay=float(optim.weight_decay),
                                layer_decay=float(optim.layer_decay), betas=optim.betas)
    step = _make_step(run, loader.batch_sampler, *build_mixup(cfg.mixup, len(classes)), eraser)
    loop = runner.loop_config(run, accum, clip_grad=cfg.clip_grad)
    history = fit(model, optimizer, loader, step, loop, run.out, resume=resume, desc="finetune")
    model.eval()
    logits, labels = runner.score(run, under_autocast(model, run.precision, run.device), val_set, batch,  # as recorded
                                  num_workers=int(cfg.data.num_workers))
    metrics = runner.topk_metrics(logits, labels)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    record = runner.finish(
        run,
        protocol={"lr": lr, "eff_batch_size": eff, "accum_iter": accum, "epochs": loop.epochs,
                  "warmup_epochs": loop.warmup_epochs, "layer_decay": float(optim.layer_decay),
                  "drop_path": float(cfg.model.drop_path), "train_transform": train_desc,
                  "val_transform": val_desc, "img_size": size, "feature": FINETUNE_FEATURE, **partial},
        metrics=metrics, dataset={"sizes": {"train": len(train_set), "val": len(val_set)},
                                  "skipped": runner.skipped(train_set, val_set)})
    save_model(run, model, record, classes=classes, img_size=size, val_transform=val_desc)
    return record


def save_model(run, model: torch.nn.Module, record: dict, *, classes, img_size: int, val_transform: str) -> None:
    """Keep the fine-tuned classifier as ``OUT/model.safetensors`` with the record's provenance
    (:mod:`mimbench.evals.classifier`), so that later evaluations (``mimbench eval robustness``) need no
    retraining; rank 0 writes it."""
    if run.is_main:
        mean, std = dataset_stats(run.data)
        save_classifier(model, run.out / MODEL_FILE, record=record, encoder_metadata=model.mimbench_metadata,
                        model_kwargs={"global_pool": "avg", "fc_norm": True, "num_classes": len(classes)},
                        img_size=img_size, classes=classes, mean=mean, std=std, data=run.data,
                        eval_transform=val_transform)
    dist.barrier()
