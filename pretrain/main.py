"""Pre-training entry point: config -> model -> :func:`mimbench.engine.fit` -> encoder file.

Optimisation follows the official MAE recipe: AdamW with betas (0.9, 0.95), weight decay on
weight matrices only (1-D parameters and ``model.no_weight_decay()`` names excluded, frozen
parameters such as an EMA teacher left out), ``lr = blr * effective_batch / 256`` with
``effective_batch = batch_size * accum_iter * world_size``, per-step warm-up + cosine schedule.
Config schema: ``pretrain/configs/_base_/default.py``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimbench.atomic import check_writable_dir
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


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW over trainable parameters; no decay for 1-D parameters and ``model.no_weight_decay()``."""
    from timm.optim import param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def resolve_batch(optim_cfg, world_size: int) -> tuple[int, int, int]:
    """(per-process batch, accum_iter, effective batch). ``optim.eff_batch_size`` (if set) fixes the
    effective batch whatever the number of processes by deriving ``accum_iter``."""
    batch = int(optim_cfg["batch_size"])
    accum = int(optim_cfg.get("accum_iter", 1) or 1)
    eff = optim_cfg.get("eff_batch_size")
    if eff:
        eff = int(eff)
        if eff % (batch * world_size):
            raise MimbenchError(
                f"optim.eff_batch_size={eff} is not a multiple of batch_size {batch} x {world_size} processes.",
                "Change optim.batch_size or the number of processes so that they divide the effective batch.")
        accum = eff // (batch * world_size)
    return batch, accum, batch * accum * world_size


def run_pretrain(config, data: str = "builtin:fashion-mnist", out=Path("runs/pretrain"), overrides=(),
                 resume: bool = False) -> Path:
    """Pre-train as ``config`` says on ``data``; returns ``out/encoder.safetensors`` (a tokenizer
    config: ``out/tokenizer.safetensors``).

    ``out`` receives ``checkpoint-latest.pt`` (+ ``checkpoint-<epoch>.pt``), ``log.jsonl`` (one
    line per log step with lr, loss, loss terms, img/s), ``config.py`` (resolved config) and the
    encoder file. ``resume=True`` continues from ``out/checkpoint-latest.pt``.
    """
    from mimbench.config import config_sha256, load_config
    from mimbench.encoders import arch_name, save_encoder
    from mimbench.engine import LoopConfig, dist_info, fit, seed_everything
    from pretrain import create_model
    from pretrain.data import build_pretrain_loader

    cfg = load_config(config, list(overrides))
    out = Path(out)
    check_writable_dir(out)
    if resume and not (out / "checkpoint-latest.pt").is_file():
        raise MimbenchError(f"--resume was given but {out / 'checkpoint-latest.pt'} does not exist.",
                            "Start without --resume, or point --out at the directory of the interrupted run.")
    for section in ("model", "optim", "schedule", "runtime"):
        if cfg.get(section) is None:
            raise MimbenchError(f"Config {config} has no `{section}` section.",
                                "Start from pretrain/configs/_base_/default.py (see its schema).")
    rank, world, local = dist_info()
    rt, opt_cfg, sch = cfg.runtime, cfg.optim, cfg.schedule
    seed = int(rt.get("seed", 0))
    seed_everything(seed)

    model_kwargs = dict(cfg.model)
    name = model_kwargs.pop("name", None) or model_kwargs.pop("type", None)
    if not name:
        raise MimbenchError(f"Config {config} does not name its model.", "Set model=dict(name='mae_vit_tiny_patch4_32', ...).")
    model = create_model(name, **model_kwargs)
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    model.to(device)

    batch, accum, eff = resolve_batch(opt_cfg, world)
    lr = float(opt_cfg.blr) * eff / 256
    optimizer = build_optimizer(model, lr=lr, weight_decay=float(opt_cfg.get("weight_decay", 0.05)),
                                betas=opt_cfg.get("betas", (0.9, 0.95)))
    data_cfg = cfg.get("data", {})
    img_size = int(data_cfg.get("img_size", model.encoder_arch()["img_size"]))
    loader = build_pretrain_loader(data, img_size=img_size, batch_size=batch, seed=seed, rank=rank,
                                   world_size=world, num_workers=int(data_cfg.get("num_workers", 0)),
                                   limit=data_cfg.get("limit"))
    # BEiT v2 configs set mask_ratio=None: their block masking counts patches (model.num_mask_patches).
    mask_ratio = rt.get("mask_ratio", 0.75)
    mask_ratio = None if mask_ratio is None else float(mask_ratio)

    def step(m, b):
        imgs = b[0].to(device, non_blocking=True)
        loss, _, _ = m(imgs, mask_ratio=mask_ratio)
        return loss, lambda: model.loss_terms

    loop = LoopConfig(epochs=int(sch.epochs), warmup_epochs=float(sch.warmup_epochs), min_lr=float(sch.get("min_lr", 0.0)),
                      accum_iter=accum, clip_grad=opt_cfg.get("clip_grad"), amp=str(rt.get("amp", "auto")),
                      ckpt_every=int(rt.get("ckpt_every", 1)), seed=seed, log_every=int(rt.get("log_every", 20)))
    if rank == 0:
        cfg.dump(str(out / "config.py"))
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
    return path
