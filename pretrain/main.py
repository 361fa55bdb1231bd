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
argument, BEiT v2's block mask through ``mask=``, drawn from one generator per image), and only
rank 0 writes the config, log, checkpoints and exported file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mimbench.atomic import atomic_write_text, check_writable_dir
from mimbench.batching import resolve_batch, scaled_lr
from mimbench.errors import MimbenchError

__all__ = ["run_pretrain", "build_optimizer", "resolve_batch"]


def _technique(cfg, model_name: str) -> str:
    if cfg.get("technique"):
        return str(cfg.technique)
    for prefix, tech in (("mae+dds", "mae+dds"), ("robust_mae", "robust-mae"), ("ddae", "ddae"), ("mae", "mae"),
                         ("beitv2+dds", "beitv2+dds"), ("beitv2", "beitv2"), ("vqkd", "vqkd")):
        if model_name.startswith(prefix):
            return tech
    return model_name


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), fast: bool = True):
    """AdamW over trainable parameters; no decay for 1-D parameters and ``model.no_weight_decay()``.

    ``fast`` picks the device's multi-tensor implementation (:func:`mimbench.fastpath.adamw_kwargs`:
    fused on CUDA, foreach on CPU); ``False`` is the per-tensor loop of the reference code."""
    from timm.optim import param_groups_weight_decay

    from mimbench.fastpath import adamw_kwargs

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
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
    import inspect

    from mimbench import dist
    from mimbench.batching import item_seed, uniform_by_index
    from mimbench.config import config_sha256, load_config
    from mimbench.data import skipped_files
    from mimbench.encoders import arch_name, save_encoder
    from mimbench.engine import LoopConfig, fit, seed_everything
    from mimbench.fastpath import maybe_compile
    from pretrain import create_model
    from pretrain.data import build_pretrain_loader

    ctx = dist.setup()  # process group and device before any model or tensor exists
    cfg = load_config(config, list(overrides), kind="pretrain")
    out = Path(out)
    if ctx.is_main:
        check_writable_dir(out)
    if resume and not (out / "checkpoint-latest.pt").is_file():
        raise MimbenchError(f"--resume was given but {out / 'checkpoint-latest.pt'} does not exist.",
                            "Start without --resume, or point --out at the directory of the interrupted run.")
    for section in ("model", "optim", "schedule", "runtime"):
        if cfg.get(section) is None:
            raise MimbenchError(f"Config {config} has no `{section}` section.",
                                "Start from pretrain/configs/_base_/default.py (see its schema).")
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    rt, opt_cfg, sch = cfg.runtime, cfg.optim, cfg.schedule
    seed = int(rt.get("seed", 0))
    seed_everything(seed)

    model_kwargs = dict(cfg.model)
    name = model_kwargs.pop("name", None) or model_kwargs.pop("type", None)
    if not name:
        raise MimbenchError(f"Config {config} does not name its model.", "Set model=dict(name='mae_vit_tiny_patch4_32', ...).")
    model = create_model(name, **model_kwargs)
    model.to(device)
    maybe_compile(model, bool(rt.get("compile", False)))

    batch, accum, eff = resolve_batch(opt_cfg, world)
    lr = scaled_lr(opt_cfg, eff)
    optimizer = build_optimizer(model, lr=lr, weight_decay=float(opt_cfg.get("weight_decay", 0.05)),
                                betas=opt_cfg.get("betas", (0.9, 0.95)))
    data_cfg = cfg.get("data", {})
    img_size = int(data_cfg.get("img_size", model.encoder_arch()["img_size"]))
    loader = build_pretrain_loader(data, img_size=img_size, batch_size=batch, seed=seed, rank=rank,
                                   world_size=world, accum_iter=accum, num_workers=int(data_cfg.get("num_workers", 0)),
                                   limit=data_cfg.get("limit"), max_bad_fraction=data_cfg.get("max_bad_fraction"))
    sampler = getattr(loader, "batch_sampler", None) or loader.sampler
    skipped = skipped_files(getattr(loader, "dataset", None))
    if rank == 0 and skipped:  # broken training images left out (mimbench.data.image_folder)
        atomic_write_text(out / "skipped_files.json", json.dumps(skipped, indent=1) + "\n",
                          what="the list of skipped files", fix="Pass an --out directory you can write to.")
    # BEiT v2 configs set mask_ratio=None: their block masking counts patches (model.num_mask_patches).
    mask_ratio = rt.get("mask_ratio", 0.75)
    mask_ratio = None if mask_ratio is None else float(mask_ratio)
    # The mask of image i is a function of (seed, epoch, i), not of the rank or batch: models whose forward
    # takes ``noise=`` (the MAE family) get per-image mask noise, models that draw block masks (BEiT v2:
    # ``draw_mask`` and ``mask=``) one generator per image; the VQ-KD tokenizer masks nothing.
    params = inspect.signature(model.forward).parameters
    takes_noise = "noise" in params
    draws_blocks = not takes_noise and "mask" in params and hasattr(model, "draw_mask")
    patch = int(model.encoder_arch()["patch_size"])

    def step(m, b):
        imgs = b[0].to(device, non_blocking=True)
        kwargs = {}
        if takes_noise:
            num_patches = (imgs.shape[-2] // patch) * (imgs.shape[-1] // patch)
            kwargs["noise"] = uniform_by_index(seed, sampler.epoch, b[2], num_patches, "mask", device=device)
        elif draws_blocks:
            gens = [torch.Generator().manual_seed(item_seed(seed, sampler.epoch, i, "mask")) for i in b[2].tolist()]
            kwargs["mask"] = model.draw_mask(len(gens), mask_ratio, device=device, generators=gens)
        loss, _, _ = m(imgs, mask_ratio=mask_ratio, **kwargs)
        return loss, lambda: model.loss_terms

    loop = LoopConfig(epochs=int(sch.epochs), warmup_epochs=float(sch.warmup_epochs), min_lr=float(sch.get("min_lr", 0.0)),
                      accum_iter=accum, clip_grad=opt_cfg.get("clip_grad"), amp=str(rt.get("amp", "auto")),
                      ckpt_every=int(rt.get("ckpt_every", 1)), ckpt_every_steps=int(rt.get("ckpt_every_steps", 0) or 0),
                      seed=seed, log_every=int(rt.get("log_every", 20)),
                      progress=bool(rt.get("progress", True)), tensorboard=bool(rt.get("tensorboard", False)))
    if rank == 0:
        atomic_write_text(out / "config.py", cfg.pretty_text, what="the resolved config",
                          fix="Pass an --out directory you can write to.")
    fit(model, optimizer, loader, step, loop, out, resume=resume, on_step_end=model.on_step_end,
        desc=f"pretrain {name}")

    # Models that write something other than a ViT encoder file (a BEiT-family encoder, a
    # tokenizer) provide ``export(path, ...)`` and ``export_name``.
    path = out / getattr(model, "export_name", "encoder.safetensors")
    if rank == 0:
        meta = dict(technique=_technique(cfg, name), config_sha256=config_sha256(cfg), epochs=float(sch.epochs),
                    data=str(data))
        if hasattr(model, "export"):
            model.export(path, **meta)
        else:
            arch = model.encoder_arch()
            save_encoder(model.encoder_state_dict(), path,
                         arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]), **meta, **arch)
    dist.barrier()  # every rank returns once the exported file exists
    return path
