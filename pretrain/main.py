"""Pre-training entry point: config -> model -> :func:`mimbench.engine.fit` -> encoder file.

Optimisation follows the official MAE recipe: AdamW with betas (0.9, 0.95), weight decay on
weight matrices only (1-D parameters and ``model.no_weight_decay()`` names excluded, frozen
parameters such as an EMA teacher left out), ``lr = blr * effective_batch / 256``
(:func:`mimbench.batching.scaled_lr`, the rule of the evaluations too) with
``effective_batch = batch_size * accum_iter * world_size`` (or ``optim.eff_batch_size``, reached by
accumulation whatever the number of processes: :func:`mimbench.batching.resolve_batch`), per-step
warm-up + cosine schedule; AdamW's multi-tensor implementation and, with ``runtime.compile``,
``torch.compile`` (:mod:`mimbench.fastpath`). Config schema: ``pretrain/configs/_base_/default.py``.

Multi-process runs (torchrun, Slurm) compute what one process does with the same effective batch:
the global batch of every step holds the same images, each image's crop, flip and mask are
functions of ``(seed, epoch, image index)`` (the MAE family's mask through the model's ``noise=``
argument, BEiT v2's block mask through ``mask=``, drawn from one generator per image: the model's
declared ``mask_input``, :mod:`pretrain.contract`), and only
rank 0 writes the config, log, checkpoints and exported file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay

from mimbench import dist, trackers
from mimbench.atomic import atomic_write_text, check_writable_dir
from mimbench.batching import item_seed, resolve_batch, scaled_lr, uniform_by_index
from mimbench.config import config_sha256, load_config, written_text
from mimbench.data import skipped_files
from mimbench.engine import LoopConfig, fit
from mimbench.errors import MimbenchError
from mimbench.fastpath import Workload, adamw_kwargs, precision_choice
from mimbench.rng import seed_everything
from pretrain.contract import export_encoder
from pretrain.data import build_pretrain_loader
from pretrain.registry import create_model, model_spec

__all__ = ["run_pretrain", "build_optimizer", "make_step", "resolve_batch"]

WRITE_FIX = "Pass an --out directory you can write to."


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), fast: bool = True):
    """AdamW over trainable parameters; no decay for 1-D parameters and ``model.no_weight_decay()``.

    ``fast`` picks the device's multi-tensor implementation (:func:`mimbench.fastpath.adamw_kwargs`:
    fused on CUDA, foreach on CPU); ``False`` is the per-tensor loop of the reference code."""
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=set(model.no_weight_decay()))
    impl = adamw_kwargs(next(model.parameters()).device) if fast else {"foreach": False}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **impl)


def run_pretrain(config, data: str = "builtin:fashion-mnist", out=Path("runs/pretrain"), overrides=(),
                 resume: bool = False) -> Path:
    """Pre-train as ``config`` says on ``data``; returns ``out/encoder.safetensors`` (a tokenizer
    config: ``out/tokenizer.safetensors``).

    ``out`` receives ``checkpoint-latest.pt`` (+ ``checkpoint-<epoch>.pt``), ``log.jsonl`` (one
    line per log step with lr, loss, loss terms, img/s), ``config.py`` (resolved config), the
    encoder file, and ``skipped_files.json`` when broken training images were left out.
    ``resume=True`` continues from ``out/checkpoint-latest.pt`` (mid-epoch when
    ``runtime.ckpt_every_steps`` wrote it there).
    """
    ctx = dist.setup()  # process group and device before any model or tensor exists
    cfg = load_config(config, list(overrides), kind="pretrain")
    trackers.selected(cfg.runtime)  # a tracker whose package is missing: refused before any work
    out = Path(out)
    _check_out(out, resume, ctx.is_main)
    seed_everything(cfg.runtime.seed)
    spec = model_spec(cfg)
    model = create_model(spec.name, **spec.kwargs).to(ctx.device)
    batch, accum, eff = resolve_batch(cfg.optim, ctx.world_size)
    optimizer = build_optimizer(model, lr=scaled_lr(cfg.optim, eff), weight_decay=cfg.optim.weight_decay,
                                betas=cfg.optim.betas)
    loader = _build_loader(cfg, data, model, batch, accum, ctx, out)
    step = make_step(model, cfg.runtime.mask_ratio, cfg.runtime.seed, loader, ctx.device)
    if ctx.is_main:
        atomic_write_text(out / "config.py", written_text(cfg), what="the resolved config", fix=WRITE_FIX)
    loop_cfg = _loop_config(cfg, accum, pretrain_workload(model, cfg), ctx.device)
    fit(model, optimizer, loader, step, loop_cfg, out, resume=resume, on_step_end=model.on_step_end,
        desc=f"pretrain {spec.name}")
    path = out / spec.export_name
    if ctx.is_main:
        export_encoder(model, path, technique=spec.technique, config_sha256=config_sha256(cfg),
                       epochs=float(cfg.schedule.epochs), data=str(data))
    dist.barrier()  # every rank returns once the exported file exists
    return path


def _check_out(out: Path, resume: bool, is_main: bool) -> None:
    if is_main:
        check_writable_dir(out)
    if resume and not (out / "checkpoint-latest.pt").is_file():
        raise MimbenchError(f"--resume was given but {out / 'checkpoint-latest.pt'} does not exist.",
                            "Start without --resume, or point --out at the directory of the interrupted run.")


def _build_loader(cfg, data: str, model, batch: int, accum: int, ctx, out: Path):
    """The training loader of ``data`` at ``data.img_size`` (the model's own size when unset); rank 0 lists
    the broken training images it left out in ``out/skipped_files.json``."""
    dcfg = cfg.data
    loader = build_pretrain_loader(data, img_size=dcfg.img_size or model.encoder_arch()["img_size"],
                                   batch_size=batch, seed=cfg.runtime.seed, rank=ctx.rank, world_size=ctx.world_size,
                                   accum_iter=accum, num_workers=dcfg.num_workers, limit=dcfg.limit,
                                   max_bad_fraction=dcfg.max_bad_fraction, decode_draft=bool(dcfg.decode_draft))
    skipped = skipped_files(getattr(loader, "dataset", None))
    if ctx.is_main and skipped:  # broken training images left out (mimbench.data.image_folder)
        atomic_write_text(out / "skipped_files.json", json.dumps(skipped, indent=1) + "\n",
                          what="the list of skipped files", fix=WRITE_FIX)
    return loader


def make_step(model, mask_ratio: float | None, seed: int, loader, device):
    """The loop's ``step(m, batch) -> (loss, loss_terms thunk)`` for ``model``.

    The mask of image i is a function of ``(seed, epoch, i)``, not of the rank or batch: a model whose
    ``mask_input`` is ``"noise"`` gets per-image mask noise (``N x L`` uniform), one that draws
    ``"blocks"`` a block mask from one generator per image (``draw_mask``), ``"none"`` nothing.
    ``mask_ratio`` None: the model's own masking amount (BEiT v2 counts patches).
    """
    sampler = getattr(loader, "batch_sampler", None) or loader.sampler
    patch = int(model.encoder_arch()["patch_size"])

    def mask_kwargs(imgs: torch.Tensor, index: torch.Tensor) -> dict:
        if model.mask_input == "noise":
            num_patches = (imgs.shape[-2] // patch) * (imgs.shape[-1] // patch)
            return {"noise": uniform_by_index(seed, sampler.epoch, index, num_patches, "mask", device=device)}
        if model.mask_input == "blocks":
            gens = [torch.Generator().manual_seed(item_seed(seed, sampler.epoch, i, "mask")) for i in index.tolist()]
            return {"mask": model.draw_mask(len(gens), mask_ratio, device=device, generators=gens)}
        return {}

    def step(m, b):
        imgs = b[0].to(device, non_blocking=True)
        loss, _, _ = m(imgs, mask_ratio=mask_ratio, **mask_kwargs(imgs, b[2]))
        return loss, lambda: model.loss_terms

    return step


def pretrain_workload(model, cfg) -> Workload:
    """The pre-training step's workload for ``amp="auto"`` (:func:`mimbench.fastpath.precision_choice`): the
    encoder's width and depth at the config's image size, seeing the visible share of the patches where the
    model drops masked ones (``mask_input == "noise"``, MAE-style) and all of them otherwise."""
    arch = model.encoder_arch()
    ratio = cfg.runtime.mask_ratio
    keep = 1.0 - float(ratio) if model.mask_input == "noise" and ratio is not None else 1.0
    return Workload.of_arch(arch, train=True, img_size=cfg.data.img_size or arch["img_size"], keep=keep)


def _loop_config(cfg, accum: int, workload: Workload | None = None, device=None) -> LoopConfig:
    """:class:`mimbench.engine.LoopConfig` from the config's ``schedule``, ``optim`` and ``runtime``, ``amp``
    resolved for ``workload`` on ``device`` (:func:`mimbench.fastpath.precision_choice`, printed with its
    reason); ``compile`` wraps the model after DistributedDataParallel, inside the loop."""
    sch, rt = cfg.schedule, cfg.runtime
    amp = str(rt.amp)
    if device is not None:
        choice = precision_choice(amp, device, workload)
        amp = choice.precision
        if dist.is_main():
            print(f"precision: {amp} ({choice.reason})", flush=True)
    return LoopConfig(epochs=int(sch.epochs), warmup_epochs=float(sch.warmup_epochs), min_lr=float(sch.min_lr),
                      accum_iter=accum, clip_grad=cfg.optim.clip_grad, amp=amp, ckpt_every=int(rt.ckpt_every),
                      ckpt_every_steps=int(rt.ckpt_every_steps), seed=int(rt.seed), log_every=int(rt.log_every),
                      progress=bool(rt.progress), tensorboard=bool(rt.tensorboard), compile=bool(rt.compile),
                      trackers=tuple(rt.trackers))
