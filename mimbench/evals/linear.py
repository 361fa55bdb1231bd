"""Linear probe of a frozen encoder (the MAE protocol, plus a fast variant on cached features).

Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` (weight trunc-normal std 0.01,
bias 0) on the class token after the encoder's final norm (``pool``/``--pool``: or the mean of the patch
tokens -- the default of encoders without class token, e.g. I-JEPA --, or both, width 2D; see
:func:`mimbench.evals.features.resolve_pool`; the record's ``protocol.feature`` and ``protocol.pool`` say which).
Only the linear layer has parameters; the
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

Blocks and tokens (``layers`` / ``pool``, ``--layers`` / ``--pool``; :class:`mimbench.evals.features.Readout`):
by default the class token of the last block after the final norm, as above. ``layers`` may name one block
(``7``, ``-2``), the last N blocks concatenated (``concat:4``, DINOv2's linear probe on its last four class
tokens), the mean of several blocks (``mean:6,7,8``, as AIM averages blocks), or ``all``: every block's feature
from one forward pass per batch, one head per block trained side by side on the same batches (:class:`BlockHeads`),
per-block metrics in the record and accuracy against depth in ``layers.png`` (MIM encoders often peak before the
last block). The sweep's ``best_block`` is selected (``selection``, ``--select-on``) by default on a held-out part of
the training set (``selection.holdout``, 10 %, drawn with the run's seed, scored without augmentation and never
trained on: :func:`holdout_split`), ``selection.on="val"`` selects it on the validation split as published
selections do; either way ``best_top1`` is the chosen block's validation accuracy and the record's
``protocol.selection`` says which. Every block is read through the encoder's final norm, as DINOv2 reads its
last four. ``pool``: the class token, the mean of the patch tokens (register tokens left out) or both concatenated;
unset or ``auto``, the encoder family's pooling for the linear probe (DINOv3: class token ⊕ patch mean, as its
authors probe it; EVA-02: the patch mean through its pooled-feature norm).

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
from mimbench.atomic import atomic_write
from mimbench.config import format_override
from mimbench.data import dataset_stats
from mimbench.engine import fit
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.features import (
    Readout, check_readout, eval_transform, extract_features, feature_read, limited, read_features, readout,
)
from mimbench.fastpath import match_attention, under_autocast
from mimbench.schema import LINEAR_OPTIMIZERS

CACHED_DEVIATION = "fast linear probe on cached features"
#: What ``layers="all"`` reports: top1/top5 of the last block, and the best block picked by validation accuracy.
BLOCK_SELECTION = "top1/top5: the last block; best_block / best_top1: selected on the val split"
#: The same with the default selection, on the held-out part of the training set.
HOLDOUT_BLOCK_SELECTION = ("top1/top5: the last block; best_block: selected on a held-out part of the training set "
                           "(not trained on); best_top1: its val accuracy")
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


def _linear(embed_dim: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(embed_dim, num_classes)
    trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear


class BlockHeads(nn.Module):
    """One linear head per block on rows holding every block's feature (``blocks`` × ``width``, block 0 first):
    scores N × blocks × C. Each head is its own ``Linear`` (its own LARS trust ratio), so training them together
    on the summed losses (:func:`probe_loss`) gives each the updates it would get alone on the same batches."""

    def __init__(self, blocks: int, width: int, num_classes: int):
        super().__init__()
        self.width = width
        self.heads = nn.ModuleList(_linear(width, num_classes) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.reshape(x.shape[0], len(self.heads), self.width)
        return torch.stack([head(parts[:, i]) for i, head in enumerate(self.heads)], dim=1)


def build_head(embed_dim: int, num_classes: int, blocks: int | None = None) -> nn.Sequential:
    """BatchNorm1d(D, affine=False, eps=1e-6) (as :class:`StepBatchNorm1d`) + Linear(D, C),
    weight ~ trunc-normal(std 0.01), bias 0. ``blocks``: one such head per block (:class:`BlockHeads`) on rows
    of ``blocks`` × ``embed_dim`` features; the batch norm, per feature, is each block's own."""
    if blocks is None:
        return nn.Sequential(StepBatchNorm1d(embed_dim, eps=1e-6), _linear(embed_dim, num_classes))
    return nn.Sequential(StepBatchNorm1d(blocks * embed_dim, eps=1e-6), BlockHeads(blocks, embed_dim, num_classes))


def _probe_head(spec: Readout, width: int, num_classes: int) -> nn.Sequential:
    """The head for features of ``width`` read as ``spec``: one per block for ``layers="all"``."""
    if spec.combine == "all":
        return build_head(width // spec.groups, num_classes, blocks=spec.groups)
    return build_head(width, num_classes)


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


#: The probe's training transform, (transform, description) of (data, img_size, scale): also timed by ``bench data``.
train_transform = _train_transform


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
    spec: Readout | None = None  # how the encoder's features are read from images; None: the class token
    holdout_set: Any = None  # training images held out for selection (never trained on); None: no hold-out


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows trained on, rows held out) of ``n`` training rows, both sorted: ``round(fraction * n)`` rows (at least
    1, at most n - 1) drawn without replacement with ``numpy.random.default_rng(seed)``."""
    held = min(max(int(round(fraction * n)), 1), n - 1)
    if held < 1:
        raise MimbenchError(f"{n} training image(s) cannot be split into a training part and a hold-out.",
                            "Use more training images, or --select-on val.")
    out = np.sort(np.random.default_rng(seed).choice(n, size=held, replace=False))
    return np.setdiff1d(np.arange(n), out), out


def _selects_on_holdout(run, spec: Readout) -> bool:
    """Whether this run selects on a hold-out of the training set: a block sweep with ``selection.on`` so set."""
    return spec.combine == "all" and run.cfg.selection.on == "train-holdout"


def _cached_probe(run, size: int, batch: int, accum: int, spec: Readout) -> Probe:
    """Head on features of the un-augmented images, extracted once and cached (``features``); the batches are
    index arrays into the features on the device."""
    cfg, device = run.cfg, run.device
    if CACHED_DEVIATION not in run.deviations:
        run.deviations.insert(0, CACHED_DEVIATION)
    common = dict(cache_dir=Path(cfg.cache_dir or run.out / "feature_cache"), img_size=size,
                  batch_size=int(cfg.feature_batch_size), num_workers=int(cfg.data.num_workers), amp=run.amp,
                  max_bad_fraction=runner.max_bad_fraction(run), layout=run.layout, layers=cfg.layers, pool=cfg.pool,
                  task="linear", decode_draft=bool(cfg.decode_draft))
    tx, ty, tinfo = extract_features(run.encoder, run.data, "train", limit=cfg.data.limit_train, **common)
    vx, vy, vinfo = extract_features(run.encoder, run.data, "val", limit=cfg.data.limit_val, **common)
    holdout_set = None
    if _selects_on_holdout(run, spec):
        keep, held = holdout_split(len(ty), float(cfg.selection.holdout), run.seed)
        holdout_set = torch.utils.data.TensorDataset(torch.from_numpy(np.array(tx[held])),
                                                     torch.from_numpy(np.array(ty[held])))
        tx, ty = tx[keep], ty[keep]
    train_x, train_y = torch.from_numpy(np.array(tx)).to(device), torch.from_numpy(np.array(ty)).to(device)
    val_set = torch.utils.data.TensorDataset(torch.from_numpy(np.array(vx)), torch.from_numpy(np.array(vy)))
    return Probe(head=_probe_head(spec, int(tx.shape[1]), len(tinfo["classes"])).to(device), encoder=None,
                 loader=runner.TensorBatches(run, train_x, train_y, batch, accum), train_size=len(train_x),
                 val_set=val_set, eval_batch=CACHED_EVAL_BATCH, holdout_set=holdout_set,
                 transforms={"train_transform": tinfo["transform"] + " (no augmentation)",
                             "val_transform": vinfo["transform"]},
                 skipped={"train": tinfo["skipped"], "val": vinfo["skipped"]})


def _protocol_probe(run, size: int, batch: int, accum: int, spec: Readout) -> Probe:
    """Head on the frozen encoder (eval mode, no gradients) of augmented images: RandomResizedCrop + flip."""
    cfg = run.cfg
    encoder_model = encoders.load_encoder(run.encoder, img_size=size, layout=run.layout).to(run.device).eval()
    check_readout(encoder_model, spec)
    match_attention(encoder_model, run.precision, run.device)
    for p in encoder_model.parameters():
        p.requires_grad_(False)
    train_tf, train_desc = _train_transform(run.data, size, cfg.augment.scale)
    val_tf, val_desc = eval_transform(run.data, size)
    train_set = runner.build_split(run, "train", transform=train_tf, img_size=size)
    val_set = runner.build_split(run, "val", transform=val_tf, img_size=size)
    skipped = runner.skipped(train_set, val_set)
    classes = list(train_set.classes)
    train_set, val_set = limited(train_set, cfg.data.limit_train), limited(val_set, cfg.data.limit_val)
    holdout_set = None
    if _selects_on_holdout(run, spec):  # the held-out images as the val split is read: no augmentation
        keep, held = holdout_split(len(train_set), float(cfg.selection.holdout), run.seed)
        unaugmented = limited(runner.build_split(run, "train", transform=val_tf, img_size=size), cfg.data.limit_train)
        train_set = torch.utils.data.Subset(train_set, keep.tolist())
        holdout_set = torch.utils.data.Subset(unaugmented, held.tolist())
    head = _probe_head(spec, spec.width(int(encoder_model.embed_dim)), len(classes)).to(run.device)
    return Probe(head=head, encoder=encoder_model,
                 loader=runner.train_loader(run, train_set, batch, accum, num_workers=int(cfg.data.num_workers)),
                 train_size=len(train_set), val_set=val_set, eval_batch=batch,
                 transforms={"train_transform": train_desc, "val_transform": val_desc}, skipped=skipped,
                 spec=None if spec.is_default else spec, holdout_set=holdout_set)


def run_linear(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
               resume: bool = False, layout: str = "auto", layers=None, pool: str | None = None,
               select_on: str | None = None) -> dict:
    """Linear probe of ``encoder`` on ``data`` with the protocol ``config``; the record is written to ``out``.

    ``layers`` / ``pool`` / ``select_on`` (``--layers`` / ``--pool`` / ``--select-on``): the config's ``layers`` /
    ``pool`` / ``selection.on`` for this run (None: the config's), added to the overrides so that the record lists
    them.
    """
    given = (("layers", layers), ("pool", pool), ("selection.on", select_on))
    overrides = [*overrides, *(format_override(k, v) for k, v in given if v is not None)]
    run = runner.start("linear", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg, device = run.cfg, run.device
    spec = readout(run.encoder, cfg.layers, cfg.pool, layout=layout, task="linear")  # a block it lacks: refused here
    batch, accum, eff, lr = runner.batch_rule(run, cfg.optim)
    size = int(cfg.img_size or encoders.read_metadata(run.encoder, layout=layout)["img_size"])
    build = _cached_probe if cfg.mode == "cached" else _protocol_probe
    probe = build(run, size, batch, accum, spec)
    optimizer = build_optimizer(probe.head, cfg.optim, lr)
    loop = runner.loop_config(run, accum)
    read = {} if probe.spec is None else {"spec": probe.spec}

    def step(head, batch_):
        x, y = batch_[0].to(device, non_blocking=True), batch_[1].to(device, non_blocking=True)
        return probe_loss(head, probe.encoder, x, y, **read), {}

    history = fit(probe.head, optimizer, probe.loader, step, loop, run.out, resume=resume,
                  desc=f"linear ({cfg.mode})", on_step_end=lambda it, total: probe.head[0].commit())
    probe.head.eval()
    val_fn = under_autocast(lambda x: probe_logits(probe.head, probe.encoder, x, **read), run.precision,
                            device)  # as recorded
    logits, labels = runner.score(run, val_fn, probe.val_set,
                                  probe.eval_batch, num_workers=int(cfg.data.num_workers))
    select = None
    if probe.holdout_set is not None:
        held_logits, held_labels = runner.score(run, val_fn, probe.holdout_set, probe.eval_batch,
                                                num_workers=int(cfg.data.num_workers))
        select = block_metrics(held_logits, held_labels, spec)["per_block"]
    metrics = runner.topk_metrics(logits, labels) if logits.ndim == 2 else block_metrics(logits, labels, spec, select)
    if history:
        metrics["train_loss"] = float(history[-1]["loss"])
    if logits.ndim == 3 and run.is_main:
        plot_depth(metrics["per_block"], run.out / "layers.png", best=metrics["best_block"])
    return runner.finish(
        run,
        protocol={"mode": cfg.mode, "optimizer": str(cfg.optim.name), "lr": lr, "eff_batch_size": eff,
                  "accum_iter": accum, "epochs": loop.epochs, "warmup_epochs": loop.warmup_epochs,
                  **probe.transforms, "img_size": size, "feature": feature_read(spec), "pool": spec.pool,
                  "readout": spec.describe(), **_selection(cfg, spec, probe)},
        metrics=metrics, dataset={"sizes": {"train": probe.train_size, "val": len(probe.val_set),
                                            **({} if probe.holdout_set is None else
                                               {"holdout": len(probe.holdout_set)})},
                                  "skipped": probe.skipped})


def _selection(cfg, spec: Readout, probe: Probe) -> dict:
    """What the record says about the sweep's selection of ``best_block`` (nothing when no block is selected)."""
    if spec.combine != "all":
        return {}
    if probe.holdout_set is None:
        return {"block_selection": BLOCK_SELECTION, "selection": {"on": "val", "selects": "best_block"}}
    return {"block_selection": HOLDOUT_BLOCK_SELECTION,
            "selection": {"on": "train-holdout", "selects": "best_block", "holdout": float(cfg.selection.holdout),
                          "holdout_images": len(probe.holdout_set)}}


def probe_logits(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor,
                 spec: Readout | None = None) -> torch.Tensor:
    """Scores (N×C; N×blocks×C for :class:`BlockHeads`) of the probe ``head`` on the frozen encoder's class
    tokens of images ``x`` (N×3×S×S) - or the features ``spec`` reads
    (:func:`~mimbench.evals.features.read_features`) - or on ``x`` itself when ``encoder_model`` is None
    (cached features, N×F)."""
    if encoder_model is not None:
        with torch.no_grad():  # frozen encoder: no graph, weights untouched
            x = encoder_model.forward_features(x)[:, 0] if spec is None else read_features(encoder_model, x, spec)
    return head(x.float())


def probe_loss(head: nn.Module, encoder_model: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
               spec: Readout | None = None) -> torch.Tensor:
    """Cross-entropy of :func:`probe_logits` against labels ``y`` (N): the linear probe's training loss. With one
    head per block, the sum of the heads' own cross-entropies (no parameter is shared: each head's gradient is
    that of its own loss)."""
    logits = probe_logits(head, encoder_model, x, **({} if spec is None else {"spec": spec}))
    if logits.ndim == 2:
        return F.cross_entropy(logits, y)
    per_item = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, logits.shape[1]), reduction="none")
    return per_item.mean(dim=0).sum()


def block_metrics(logits: torch.Tensor, labels: torch.Tensor, spec: Readout, select: dict | None = None) -> dict:
    """Metrics of one head per block (scores N×blocks×C): ``top1`` / ``top5`` of the last block (the number
    chosen without looking at validation), ``per_block`` {block: {top1, top5}}, and ``best_block`` with its
    ``best_top1`` (its accuracy on these scores) - chosen by the top-1 of ``select`` (per-block metrics of the
    training hold-out) or, when None, of these scores (the validation split), the deeper block on a tie (the
    record's ``protocol.block_selection`` says which); ``select_top1``: the chosen block's hold-out top-1."""
    per_block = {str(b): runner.topk_metrics(logits[:, i], labels) for i, b in enumerate(spec.blocks)}
    chooser = per_block if select is None else select
    best = max(spec.blocks, key=lambda b: (chooser[str(b)]["top1"], b))
    last = per_block[str(spec.blocks[-1])]
    return {"top1": last["top1"], "top5": last["top5"], "best_block": best,
            "best_top1": per_block[str(best)]["top1"], "per_block": per_block,
            **({} if select is None else {"select_top1": select[str(best)]["top1"]})}


def plot_depth(per_block: dict, out: Path, *, best: int) -> Path:
    """``out`` (PNG): top-1 accuracy of each block's head against the block index, the best block marked."""
    # matplotlib is heavy and only needed for this figure: imported when it is drawn
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    blocks = [int(b) for b in per_block]
    top1 = [per_block[str(b)]["top1"] for b in blocks]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(blocks, top1, marker="o")
    ax.plot([best], [per_block[str(best)]["top1"]], marker="*", markersize=14, linestyle="none",
            label=f"best: block {best}")
    ax.set(xlabel="block (0 = first)", ylabel="top-1 accuracy (%)", title="Linear probe by depth")
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), what="the depth plot",
                 fix="Give --out a folder you can write to.")
    plt.close(fig)
    return out
