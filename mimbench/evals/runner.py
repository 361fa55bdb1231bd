"""What every evaluation does, written once: the task modules (``linear``, ``finetune``, ``knn``,
``segment``) keep only their model, optimizer, step and metric.

:func:`start` - distributed setup (:func:`mimbench.dist.setup`, before any model exists), encoder
check, config + ``--set`` overrides checked against the task's schema (:mod:`mimbench.schema`), the
recorded seed; returns an :class:`EvalRun`.
:func:`batch_rule` - micro-batch, accumulation, effective batch and learning rate, the rule
pre-training uses too (:mod:`mimbench.batching`).
:func:`loop_config` - the training loop settings from the config's ``schedule`` and ``runtime`` sections.
:func:`build_split` - a split of the data, broken files skipped up to ``data.max_bad_fraction``;
:func:`skipped` lists them for the record.
:func:`train_loader` - a loader whose optimizer steps hold the same images on any number of
processes, each image's augmentation seeded by ``(seed, epoch, index)``; batches are
``(images, labels, indices)``.
:func:`score` - the validation set sharded over ranks (each image scored once), scores gathered
in dataset order on every rank, so metrics are identical on all ranks.
:func:`finish` - record assembly, including the compute precision the run used
(``hardware.precision``, :attr:`EvalRun.precision`); rank 0 writes it and logs its metrics to the run's
trackers (:mod:`mimbench.trackers`), every rank returns it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mimbench import dist, trackers
from mimbench.batching import GlobalBatchSampler, SeededItems, resolve_batch, scaled_lr, shard_range
from mimbench.config import config_sha256, load_config
from mimbench.data import build_dataset, draft_size, is_builtin, skipped_files
from mimbench.data.loading import loader_options
from mimbench.encoders import check_encoder_file, read_metadata
from mimbench.engine import LoopConfig, seed_everything
from mimbench.errors import MimbenchError
from mimbench.evals.metrics import topk_accuracy
from mimbench.fastpath import PrecisionChoice, Workload, precision_choice
from mimbench.results.records import encoder_summary, new_record, write_record
from mimbench.schema import FILLED_KINDS, RUNTIME_KEYS

__all__ = ["EvalRun", "start", "batch_rule", "loop_config", "train_loader", "TensorBatches", "score", "topk_metrics", "finish",
           "dataset_root", "max_bad_fraction", "build_split", "skipped", "runtime_value"]


#: Tasks whose loop trains the encoder (the others run it frozen, inference for the precision rule).
TRAINS_ENCODER = frozenset({"finetune", "segment"})


@dataclass
class EvalRun:
    """One evaluation run: its inputs, loaded config, seed and the process's place in the job."""

    task: str
    encoder: Path
    config_path: Path
    cfg: Any
    data: str
    out: Path
    overrides: list[str]
    seed: int
    ctx: Any  # mimbench.dist.DistContext
    started: float
    deviations: list[str] = field(default_factory=list)
    layout: str = "auto"  # checkpoint layout of ``encoder`` (--from), mimbench.encoders.convert.LAYOUTS
    encoder_meta: dict | None = None  # the encoder's metadata where ``encoder`` is no encoder file (a classifier)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def amp(self) -> str:
        """The config's ``runtime.amp`` (a segmentation config has none: the schema's default, whose precision
        the segmentation runner replaces by its optimizer wrapper's)."""
        return str(runtime_value(self.cfg, self.task, "amp"))

    @property
    def precision(self) -> str:
        """What ``amp`` resolves to for this run's encoder on its device: bf16 | fp16 | none (fp32),
        :func:`mimbench.fastpath.precision_choice`."""
        return self.precision_choice.precision

    @cached_property
    def precision_choice(self) -> PrecisionChoice:
        """The precision and its reason (the record's ``hardware.precision_reason``)."""
        return precision_choice(self.amp, self.device, self.workload)

    @cached_property
    def workload(self) -> Workload | None:
        """The encoder's workload at the config's image size (training where the task trains the encoder,
        :data:`TRAINS_ENCODER`); None where its metadata cannot be read."""
        try:
            meta = self.encoder_meta or read_metadata(self.encoder, layout=self.layout)
        except (MimbenchError, OSError, KeyError, ValueError):
            return None
        size = self.cfg.get("img_size") if hasattr(self.cfg, "get") else None
        try:
            return Workload.of_arch(meta, train=self.task in TRAINS_ENCODER, img_size=size)
        except (KeyError, ValueError, TypeError):
            return None


def start(task: str, *, encoder: Path, config: Path, data: str, out: Path, overrides=(),
          check_encoder: bool = True, layout: str = "auto", encoder_meta: dict | None = None) -> EvalRun:
    """Set up the processes and device, check the encoder, load the config, seed everything. ``encoder_meta``:
    the encoder's metadata where ``encoder`` is not an encoder file (a fine-tuned classifier), for the precision
    rule's workload."""
    started = time.time()
    ctx = dist.setup()
    encoder, out = Path(encoder), Path(out)
    if check_encoder:
        check_encoder_file(encoder)
    cfg = load_config(config, list(overrides), kind=task)
    trackers.selected(cfg.get("runtime"))  # a tracker whose package is missing: refused before any work
    seed = int(runtime_value(cfg, task, "seed"))
    seed_everything(seed)  # head initialisation (and all later randomness) follows the recorded seed
    deviations = list(cfg.deviations) if task in FILLED_KINDS else []  # segmentation: adapt_config lists them
    if task in FILLED_KINDS and bool(cfg.decode_draft) and not is_builtin(str(data)):
        deviations.append("JPEGs decoded downscaled (PIL draft, decode_draft=True) instead of in full")
    return EvalRun(task=task, encoder=encoder, config_path=Path(config), cfg=cfg, data=str(data), out=out,
                   overrides=list(overrides), seed=seed, ctx=ctx, started=started, deviations=deviations,
                   layout=layout, encoder_meta=encoder_meta)


def runtime_value(cfg, kind: str, key: str):
    """``cfg.runtime.<key>``; for a kind whose configs have no runtime section (an mmsegmentation config),
    the schema's default of that key (:data:`mimbench.schema.RUNTIME_KEYS`)."""
    return cfg.runtime[key] if kind in FILLED_KINDS else RUNTIME_KEYS[key].default


def batch_rule(run: EvalRun, optim: Mapping) -> tuple[int, int, int, float]:
    """``(micro-batch per process, accum_iter, effective batch, lr)``; see :mod:`mimbench.batching`."""
    batch, accum, eff = resolve_batch(optim, run.world_size)
    return batch, accum, eff, scaled_lr(optim, eff)


def loop_config(run: EvalRun, accum: int, *, clip_grad=None):
    """:class:`mimbench.engine.LoopConfig` from the config's ``schedule`` and ``runtime`` sections."""
    sched, rt = run.cfg.schedule, run.cfg.runtime
    return LoopConfig(epochs=int(sched.epochs), warmup_epochs=float(sched.warmup_epochs), min_lr=float(sched.min_lr),
                      accum_iter=accum, clip_grad=clip_grad, amp=run.precision, ckpt_every=int(rt.ckpt_every),
                      ckpt_every_steps=int(rt.ckpt_every_steps), seed=run.seed, log_every=int(rt.log_every),
                      progress=bool(rt.progress), tensorboard=bool(rt.tensorboard), trackers=tuple(rt.trackers))


def max_bad_fraction(run: EvalRun) -> float | None:
    """``data.max_bad_fraction``: the share of broken files a folder split may skip (None: the loader's default)."""
    return run.cfg.data.max_bad_fraction


def build_split(run: EvalRun, split: str, *, transform, img_size: int):
    """``split`` of the run's data; a folder's broken files are skipped up to :func:`max_bad_fraction`
    (:func:`mimbench.data.image_folder`)."""
    return build_dataset(run.data, split, transform=transform, img_size=img_size,
                         max_bad_fraction=max_bad_fraction(run), decode_draft=decode_draft(run, img_size))


def decode_draft(run: EvalRun, img_size: int) -> int | None:
    """The JPEG decode-time downscaling target of the config's ``decode_draft`` (off by default): the shorter side kept
    at least the evaluation resize of ``img_size`` (:func:`mimbench.data.draft_size`); None when off."""
    on = run.task in FILLED_KINDS and bool(run.cfg.decode_draft)
    return draft_size(img_size) if on else None


def skipped(train, val) -> dict:
    """The record's ``dataset.skipped``: the broken files each split left out."""
    return {"train": skipped_files(train), "val": skipped_files(val)}


def train_loader(run: EvalRun, dataset, batch: int, accum: int, *, num_workers: int = 0):
    """Training batches ``(images, labels, indices)`` of ``dataset`` for this rank.

    Optimizer step ``t`` holds the same images on any number of processes (order = f(seed, epoch),
    :class:`mimbench.batching.GlobalBatchSampler`), and image ``i``'s random transform is drawn
    with the RNGs seeded by ``(seed, epoch, i)``. ``loader.batch_sampler.epoch`` is the epoch.
    """
    sampler = GlobalBatchSampler(len(dataset), batch, accum, seed=run.seed, rank=run.rank,
                                 world_size=run.world_size, with_epoch=True)
    return torch.utils.data.DataLoader(SeededItems(dataset, run.seed, stream=f"{run.task}-augment"),
                                       batch_sampler=sampler, **loader_options(num_workers, run.device))


class TensorBatches:
    """:func:`train_loader`'s batching for tensors already in memory (e.g. cached features, no
    augmentation): ``(x[idx], y[idx], idx)`` for this rank's micro-batches, indexed on the tensors' device."""

    def __init__(self, run: EvalRun, x: torch.Tensor, y: torch.Tensor, batch: int, accum: int):
        self.x, self.y = x, y
        self.batch_sampler = GlobalBatchSampler(len(x), batch, accum, seed=run.seed, rank=run.rank,
                                                world_size=run.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, first: int):
        """The epoch's micro-batches from micro-batch ``first`` on (a mid-epoch resume)."""
        for chunk in self.batch_sampler.iter_from(first):
            idx = torch.tensor(chunk, dtype=torch.int64)
            dev_idx = idx.to(self.x.device)
            yield self.x[dev_idx], self.y[dev_idx], idx


@torch.no_grad()
def score(run: EvalRun, fn: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int, *,
          num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores N×C float32, labels N)`` of all of ``dataset`` on every rank, each item computed once.

    Rank ``r`` runs ``fn`` (inputs already on the run's device) over its contiguous shard
    (:func:`mimbench.batching.shard_range`); the shards are gathered in rank order, i.e. dataset order.
    """
    part = torch.utils.data.Subset(dataset, shard_range(len(dataset), run.rank, run.world_size))
    loader = torch.utils.data.DataLoader(part, batch_size=int(batch_size), shuffle=False,
                                         **{**loader_options(num_workers, run.device), "persistent_workers": False})
    logits, labels = [], []
    for x, y, *_ in loader:
        logits.append(fn(x.to(run.device, non_blocking=True)).float())
        labels.append(torch.as_tensor(y).to(run.device))
    if logits:
        logits_t, labels_t = torch.cat(logits), torch.cat(labels).long()
    else:  # more ranks than items: this rank's shard is empty; one probe item gives the score width
        logits_t = fn(torch.as_tensor(dataset[0][0]).unsqueeze(0).to(run.device)).float()[:0]
        labels_t = torch.zeros(0, dtype=torch.long, device=run.device)
    logits_t, labels_t = dist.gather_rows(logits_t), dist.gather_rows(labels_t)
    if logits_t.shape[0] != len(dataset):
        raise MimbenchError(f"Gathered {logits_t.shape[0]} scores for {len(dataset)} validation items.",
                            "This is a bug; please report it with the command line.")
    return logits_t.cpu(), labels_t.cpu()


def topk_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"top1", "top5"}`` accuracies in percent (top-5 is top-C with fewer than 5 classes)."""

    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": acc[1], "top5": acc[5]}


def dataset_root(data: str) -> str | None:
    """The record's ``dataset.root``: None for built-in data, else the absolute path."""
    return None if is_builtin(data) else str(Path(data).resolve())


def finish(run: EvalRun, *, protocol: Mapping, metrics: Mapping, dataset: Mapping | None = None,
           name: str | None = None, precision: str | None = None) -> dict:
    """Assemble the run record (protocol name / sha256 / config / overrides / deviations filled in,
    ``hardware.precision`` = ``precision`` or else :attr:`EvalRun.precision`); rank 0 writes it to
    ``run.out``; every rank returns it once the file exists."""
    record = new_record(
        run.task,
        protocol={"name": run.config_path.stem, "sha256": config_sha256(run.cfg), "config": str(run.config_path),
                  "overrides": list(run.overrides), "deviations": list(run.deviations), **protocol},
        encoder=encoder_summary(run.encoder, layout=run.layout),
        dataset={"name": name or run.data, "root": dataset_root(run.data), **(dataset or {})},
        metrics=dict(metrics),
        seed=run.seed,
        started=run.started,
        finished=time.time(),
        precision=precision or run.precision,
        precision_reason=None if precision else run.precision_choice.reason,
    )
    if run.is_main:
        write_record(run.out, record)
        trackers.log_record(trackers.selected(run.cfg.get("runtime")), run.out, record)
    dist.barrier()
    return record
