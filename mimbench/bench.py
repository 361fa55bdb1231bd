"""``mimbench bench``: how fast each hot loop runs on this machine, measured against the plain path.

Modes (random inputs of the configured shape, so only the computation is timed; ``data`` times the
input pipeline alone):

``pretrain``  one optimizer step of a pre-training config (forward at the mask ratio, backward,
              AdamW, ``on_step_end`` e.g. the DDAE teacher EMA).
``features``  frozen-encoder feature extraction (class token after the final norm), as the k-NN and
              cached linear probe compute it (:func:`mimbench.evals.features.class_tokens`).
``linear``    one linear-probe step in protocol mode: frozen encoder forward + BatchNorm/Linear head
              step with the config's optimizer (LARS or Adam), the probe's loss
              (:func:`mimbench.evals.linear.probe_loss`).
``finetune``  one fine-tuning step: the whole ViT with avg pooling + fc_norm, drop path, layer-decay
              AdamW, the protocol's Mixup/CutMix and soft-target cross-entropy
              (:func:`mimbench.evals.finetune.build_mixup`, :func:`~mimbench.evals.finetune.mixup_loss`).
``segment``   one mmseg ``train_step`` of a UperNet segmentation config on crop-sized images.

The task modes are those of the evaluation tasks' entries (:data:`mimbench.evals.tasks.TASKS`: ``bench_mode``,
and ``bench_step`` the builder of the timed step, with the signature of :func:`linear_step`); :func:`modes`
lists them all.
``data``      decode + augment throughput of an ImageFolder tree of JPEGs: decode img/s in full and
              downscaled at decode time (PIL ``draft``), augment img/s of each protocol transform
              (:func:`protocol_transforms`: pre-training, fine-tune, linear, eval), one worker's img/s and the
              workers a model step of ``--step-img-per-s`` needs; then the MAE transform through a DataLoader
              with ``--workers`` (the plain path: 0 workers; the two run one after the other).

``--amp calibrate`` (step modes) times the fast path in fp32 and bf16, interleaved, for that workload and records
each img/s, the fastest and what ``amp="auto"`` picks (:func:`mimbench.fastpath.precision_choice`); it changes no
default. ``--suite gpu`` (:func:`run_suite`) runs :data:`GPU_SUITE` and appends Markdown rows.

**Fast path** (what the project runs by default; :mod:`mimbench.fastpath`): the precision of
``amp`` (``--amp`` or the config's; "auto": bf16 on CUDA, on the CPU the rule of CPU kind and workload), fused
attention (``F.scaled_dot_product_attention``; timm's explicit path under bf16 on the CPU,
:func:`mimbench.fastpath.attention_fused`), multi-tensor/fused AdamW, ``torch.inference_mode``
for feature extraction, optionally ``torch.compile`` (``--compile``, or ``runtime.compile`` of a
pre-training config). **Plain path** (``--compare``): fp32, explicit softmax attention, per-tensor
AdamW loop, ``torch.no_grad`` - what reference-style code does - built from the same weights and
inputs. The two paths alternate step by step (A B A B ...) in one process, so a machine whose
speed drifts (shared CPUs, clocks) slows both alike and their ratio stays meaningful.

**Timing**: ``warmup`` untimed steps per path first (compilation, allocator, caches), then
``steps`` timed steps, each between device synchronisations. Reported per path: images/s
(batch / median step time), median / min / max / interquartile range of the step time in ms,
FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` over one eager step: matmuls,
convolutions and attention, forward + backward where the step has one), achieved TFLOP/s, and
MFU = achieved / peak when a peak is known (``--peak-tflops``, or the bf16 dense peak of a
recognised GPU, :data:`PEAK_TFLOPS`). Memory: on CUDA the step's peak allocation above what was
allocated before it (activations, gradients, workspace), per image; on CPU the process's peak
resident set (one figure for the whole process).

The result is a run record of task ``bench`` (``<out>/bench-<id>.json``) whose metrics hold the
fast path's figures, ``plain_*`` the plain path's, ``speedup`` their img/s ratio and
``speedup_paired`` the median over rounds of (plain step time / fast step time).
"""
from __future__ import annotations

import functools
import math
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from mimbench.batching import scaled_lr
from mimbench.config import config_sha256, load_config
from mimbench.data import build_dataset, dataset_stats, draft_size
from mimbench.data.folders import load_image
from mimbench.data.transforms import finetune_train_transform
from mimbench.encoders import check_encoder_file, load_encoder, read_metadata
from mimbench.errors import MimbenchError
from mimbench.evals import finetune, linear
from mimbench.evals.features import class_tokens, eval_transform, resolve_pool
from mimbench.evals.linear import train_transform as linear_train_transform
from mimbench.evals.runner import runtime_value
from mimbench.evals.segment import adapt_config, replace_sync_bn
from mimbench.evals.tasks import Task, all_tasks, resolve
from mimbench.fastpath import (Workload, autocast_factory, match_attention, maybe_compile, precision_choice,
                               set_fused_attention)
from mimbench.paths import PRETRAIN_CONFIGS, eval_config, resolve_config
from mimbench.results.records import encoder_summary, new_record, write_record
from pretrain import create_model, model_spec
from pretrain.data import mae_pretrain_transform
from pretrain.main import build_optimizer, pretrain_workload

#: Config of ``bench pretrain`` when none is given (a task's mode defaults to the task's demo config).
PRETRAIN_CONFIG = PRETRAIN_CONFIGS / "mae_tiny_fmnist.py"
#: Image size of ``bench data`` without a config (else the pre-training config's data.img_size).
DATA_IMG_SIZE = 224
#: Classes of the random labels of the linear and fine-tuning steps (ImageNet-1k's head).
NUM_CLASSES = 1000
#: Dense bf16 tensor-core peaks (TFLOP/s) by GPU name fragment, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0}
#: Encoder used by features / linear / finetune when neither --encoder nor --arch is given.
DEFAULT_ARCH = "vit_base_patch16_224"
PLAIN = "fp32, explicit-softmax attention, per-tensor AdamW loop, torch.no_grad, eager"


# ---------------------------------------------------------------------------- helpers
def default_workers() -> int:
    """Data-loader workers for this machine: the CPUs this process may run on (at least 1)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def known_peak_tflops(device: torch.device) -> float | None:
    """bf16 dense peak of a recognised GPU (:data:`PEAK_TFLOPS`), else None (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _summary(times_s: list[float], batch: int) -> dict:
    ms = sorted(t * 1000 for t in times_s)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0], ms[0], ms[0]]
    median = statistics.median(ms)
    return {"img_per_s": batch / (median / 1000), "step_ms_median": median, "step_ms_min": ms[0],
            "step_ms_max": ms[-1], "step_ms_iqr": q[2] - q[0]}


def time_paths(paths: dict[str, Callable[[], object]], *, steps: int, warmup: int,
               device: torch.device) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Run every path ``warmup`` times, then ``steps`` rounds of one step per path in turn; returns
    step times (s) and, on CUDA, each path's peak allocation above its starting point (bytes)."""
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    _sync(device)
    times = {name: [] for name in paths}
    peaks = {name: 0 for name in paths}
    for _ in range(steps):
        for name, fn in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start_mem = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - start_mem)
    return times, peaks


def _check_positive(**values) -> None:
    bad = {k: v for k, v in values.items() if v is not None and int(v) < 1}
    if bad:
        raise MimbenchError(f"{', '.join(f'--{k} {v}' for k, v in bad.items())}: must be >= 1.", "Pass positive numbers.")


# ---------------------------------------------------------------------------- models
def _encoder(encoder: Path | None, arch: str | None, img_size: int | None, **timm_kwargs):
    """(timm ViT, img_size): the encoder file's weights, or a random-init timm ``arch``."""
    if encoder is not None:
        size = int(img_size or read_metadata(encoder)["img_size"])
        return load_encoder(encoder, img_size=size, **timm_kwargs), size
    try:
        kwargs = {"pretrained": False, **({"img_size": img_size} if img_size else {}), **timm_kwargs}
        model = timm.create_model(arch or DEFAULT_ARCH, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise MimbenchError(f"--arch {arch!r}: {exc}", "Pass a timm ViT name such as vit_base_patch16_224, or --encoder.")
    return model, int(model.patch_embed.img_size[0])


def _seeded(fn):
    """Build with torch's RNG at seed 0, so the fast and plain paths get the same weights and inputs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.manual_seed(0)
        return fn(*args, **kwargs)
    return wrapper


@_seeded
def pretrain_step(cfg, batch, device, fast, autocast, encoder=None, arch=None):
    """One pre-training optimizer step of ``cfg`` (the model it names; ``encoder`` and ``arch`` unused)."""
    spec = model_spec(cfg)
    model = create_model(spec.name, **spec.kwargs).to(device).train()
    set_fused_attention(model, fast)
    opt_cfg = cfg.optim
    optimizer = build_optimizer(model, lr=scaled_lr(opt_cfg, batch), weight_decay=float(opt_cfg.weight_decay),
                                betas=opt_cfg.betas, fast=fast)
    size = int(cfg.data.img_size or model.encoder_arch()["img_size"])
    imgs = torch.randn(batch, 3, size, size, device=device)
    mask_ratio = float(cfg.runtime.mask_ratio)

    def step():
        with autocast():
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_step_end(0, 10**6)

    return model, step, {"model": spec.name, "img_size": size, "mask_ratio": mask_ratio}


def _inputs(batch: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (batch×3×size×size) and labels (batch, of :data:`NUM_CLASSES`)."""
    return (torch.randn(batch, 3, size, size, device=device),
            torch.randint(0, NUM_CLASSES, (batch,), device=device))


@_seeded
def features_step(cfg, batch, device, fast, autocast, encoder, arch):
    """Feature extraction of a batch, as the k-NN evaluation and the cached linear probe do it."""
    model, size = _encoder(encoder, arch, cfg.img_size, num_classes=0)
    model = model.to(device).eval()
    set_fused_attention(model, fast)
    imgs, _ = _inputs(batch, size, device)
    grad_off = torch.inference_mode if fast else torch.no_grad
    meta = getattr(model, "mimbench_metadata", None)  # an encoder file: pooled as its evaluations pool it
    pool = resolve_pool("auto", meta) if meta is not None else "cls"

    def step():
        return class_tokens(model, imgs, autocast, grad_off, pool=pool)

    return model, step, {"img_size": size}


@_seeded
def linear_step(cfg, batch, device, fast, autocast, encoder, arch):
    """One linear-probe optimizer step (protocol mode: the frozen encoder runs on every batch).

    The signature of every bench step builder: ``cfg`` the loaded config, ``batch`` images per step, ``fast``
    the fast path (else the plain one), ``autocast`` a context factory, ``encoder`` / ``arch`` the model.
    Returns ``(model, step, info)``: the module whose attention is switched, the step, protocol fields.
    """
    model, size = _encoder(encoder, arch, cfg.img_size, num_classes=0)
    model = model.to(device).eval().requires_grad_(False)
    set_fused_attention(model, fast)
    head = linear.build_head(model.embed_dim, NUM_CLASSES).to(device)
    optim = dict(cfg.optim)
    optimizer = linear.build_optimizer(head, optim, scaled_lr(optim, batch))
    imgs, labels = _inputs(batch, size, device)

    def step():
        with autocast():
            loss = linear.probe_loss(head, model, imgs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head[0].commit()  # the batch-norm statistics update of an optimizer step, as in the probe's loop

    return model, step, {"img_size": size, "optimizer": str(optim["name"])}


@_seeded
def finetune_step(cfg, batch, device, fast, autocast, encoder, arch):
    """One fine-tuning optimizer step with the protocol's Mixup/CutMix and soft-target cross-entropy."""
    model, size = _encoder(encoder, arch, cfg.img_size, global_pool="avg", fc_norm=True,
                           drop_path_rate=float(cfg.model.drop_path), num_classes=NUM_CLASSES)
    model = model.to(device).train()
    set_fused_attention(model, fast)
    optim = dict(cfg.optim)
    optimizer = finetune.build_optimizer(model, lr=scaled_lr(optim, batch), weight_decay=float(optim["weight_decay"]),
                                         layer_decay=float(optim["layer_decay"]), betas=optim["betas"], fast=fast)
    mixup, criterion = finetune.build_mixup(cfg.mixup, NUM_CLASSES)
    imgs, labels = _inputs(batch, size, device)

    def step():
        with autocast():
            loss = finetune.mixup_loss(model, imgs, labels, mixup, criterion)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, {"img_size": size}


def _segmentation_model(cfg, device, encoder):
    """(mmseg model in train mode, its optim wrapper) of a segmentation config, the encoder's shape plugged in."""
    import mimbench.seg  # noqa: F401  (mmcv.ops fallback and registrations before mmseg)
    from mmengine.optim import build_optim_wrapper  # the mmseg / mmengine stack: only for this mode
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    if encoder is not None:
        from mimbench.seg.backbone import backbone_cfg_from_metadata

        adapt_config(cfg, backbone_cfg_from_metadata(read_metadata(encoder), cfg.crop_size[0]),
                     cuda=device.type == "cuda")
    if cfg.optim_wrapper.type == "AmpOptimWrapper":  # precision is the bench's choice (autocast below)
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
        cfg.optim_wrapper.pop("dtype", None)
    replace_sync_bn(cfg.model)  # one process
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model).to(device).train()
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


@_seeded
def segment_step(cfg, batch, device, fast, autocast, encoder, arch):
    """One mmseg ``train_step`` of the UperNet config on random crop-sized images and label maps."""
    from mmengine.structures import PixelData  # the mmseg stack: only for this mode
    from mmseg.structures import SegDataSample

    cfg = cfg.copy()
    crop = tuple(cfg.crop_size)
    model, optim_wrapper = _segmentation_model(cfg, device, encoder)
    set_fused_attention(model, fast)
    num_classes = int(cfg.model.decode_head.num_classes)
    inputs = [torch.randint(0, 256, (3, *crop), dtype=torch.uint8) for _ in range(batch)]
    samples = []
    for _ in range(batch):
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, num_classes, (1, *crop))))
        sample.set_metainfo(dict(img_shape=crop, ori_shape=crop, pad_shape=crop))
        samples.append(sample)

    def step():
        with autocast():
            model.train_step(dict(inputs=inputs, data_samples=samples), optim_wrapper)

    return model, step, {"img_size": crop[0]}


def _bench_tasks() -> dict[str, Task]:
    return {t.bench_mode: t for t in all_tasks() if t.bench_mode is not None}


def modes() -> tuple[str, ...]:
    """Every bench mode: ``pretrain``, each task's mode (table order), ``data``."""
    return ("pretrain", *_bench_tasks(), "data")


def _dotted(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# ---------------------------------------------------------------------------- data
#: The protocol configs whose transforms ``bench data`` times (their ``augment`` sections).
DATA_PROTOCOL_CONFIGS = {"finetune": "finetune/mae_vit-b_in1k.py", "linear": "linear/mae_vit-b_in1k.py"}


def protocol_transforms(data: str, img_size: int) -> dict[str, tuple[Callable, str]]:
    """(transform, description) of each protocol pipeline, from the project's own builders: ``pretrain`` (MAE
    RandomResizedCrop + flip), ``finetune`` (RandomResizedCrop + flip + RandAugment + random erasing, the fine-tune
    protocol config's ``augment``), ``linear`` (RandomResizedCrop + flip at the linear protocol's scale) and
    ``eval`` (resize + centre crop)."""
    ft = load_config(eval_config(DATA_PROTOCOL_CONFIGS["finetune"]), kind="finetune").augment
    lin = load_config(eval_config(DATA_PROTOCOL_CONFIGS["linear"]), kind="linear").augment
    mean, std = dataset_stats(data)
    return {
        "pretrain": (mae_pretrain_transform(img_size), "mae-pretrain: randomresizedcrop(0.2-1, bicubic)/hflip"),
        "finetune": finetune_train_transform(img_size=img_size, mean=mean, std=std, auto_augment=ft.auto_augment,
                                             re_prob=float(ft.re_prob), re_mode=ft.re_mode, re_count=int(ft.re_count)),
        "linear": linear_train_transform(data, img_size, lin.scale),
        "eval": eval_transform(data, img_size),
    }


def _per_image_s(fn, items) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - t0) / max(len(items), 1)


def decode_augment_rates(dataset, transforms: dict, *, images: int, draft: int) -> dict:
    """Main-process img/s of decoding ``images`` files of ``dataset`` (in full, and downscaled at decode time to
    ``draft`` pixels a side), of each transform on those decoded images, and their combination: the img/s one
    loader worker gives (``<transform>_per_worker_img_per_s``, ``..._draft_...`` with the downscaled decode)."""
    paths = [path for path, _ in dataset.samples[:images]]
    out = {}
    decoded = {}
    for tag, size in (("", None), ("draft_", draft)):
        decoded[tag] = [load_image(p, draft=size) for p in paths]  # warms the file cache for the timed pass
        out[f"{tag}decode_img_per_s"] = 1.0 / _per_image_s(lambda p: load_image(p, draft=size), paths)
    torch.manual_seed(0)
    for name, (transform, _) in transforms.items():
        for tag in ("", "draft_"):
            augment = _per_image_s(transform, decoded[tag])
            out[f"{name}_{tag}augment_img_per_s"] = 1.0 / augment
            out[f"{name}_{tag}per_worker_img_per_s"] = 1.0 / (1.0 / out[f"{tag}decode_img_per_s"] + augment)
    out["draft_decode_speedup"] = out["draft_decode_img_per_s"] / out["decode_img_per_s"]
    return out


def workers_needed(metrics: dict, transforms, step_img_per_s: float | None) -> dict:
    """Per transform: the loader workers that keep a model step of ``step_img_per_s`` fed (``ceil(step / per
    worker)``), full and downscaled decoding; empty without a step rate."""
    if not step_img_per_s:
        return {}
    return {f"{name}_{tag}workers_needed": math.ceil(float(step_img_per_s) / metrics[f"{name}_{tag}per_worker_img_per_s"])
            for name in transforms for tag in ("", "draft_")}


def _bench_data(data: str | None, *, img_size: int, batch: int, steps: int, warmup: int, workers: int,
                compare: bool, step_img_per_s: float | None = None) -> tuple[dict, dict]:
    """Decode and augment img/s per worker of each protocol transform over an ImageFolder tree's train split
    (:func:`decode_augment_rates`), then the MAE pre-training transform through a DataLoader with ``workers``."""
    if not data or str(data).startswith("builtin:"):
        raise MimbenchError("bench data needs an ImageFolder tree (--data ROOT with ROOT/train/<class>/*.JPEG).",
                            "Pass --data /path/to/imagenet; the built-in set is decoded once, not per step.")
    dataset = build_dataset(str(data), "train", transform=mae_pretrain_transform(img_size), img_size=img_size)
    transforms = protocol_transforms(str(data), img_size)
    per_image = decode_augment_rates(dataset, transforms, images=min(len(dataset), max(steps, 1) * batch),
                                     draft=draft_size(img_size))
    per_image.update(workers_needed(per_image, transforms, step_img_per_s))

    def rate(num_workers: int) -> dict:
        # Each worker holds at most one finished batch (prefetch_factor=1), and those `num_workers`
        # batches arrive at once after the warm-up; with more than twice as many timed batches the
        # median interval between batches is a steady-state one.
        timed = max(steps, 2 * num_workers + 1)
        needed = (max(warmup, 1) + timed) * batch
        sampler = torch.utils.data.RandomSampler(dataset, replacement=needed > len(dataset), num_samples=needed,
                                                 generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                                             drop_last=True, **({"prefetch_factor": 1} if num_workers else {}))
        it = iter(loader)
        for _ in range(max(warmup, 1)):  # worker start-up and the first batches are not counted
            next(it)
        times = []
        for _ in range(timed):
            t0 = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t0)
        del it
        out = _summary(times, batch)
        out["img_per_s_per_worker"] = out["img_per_s"] / max(num_workers, 1)
        out["workers"] = num_workers
        return out

    fast = rate(workers)
    metrics = {**fast, **per_image}
    if compare:
        plain = rate(0)
        metrics.update({f"plain_{k}": v for k, v in plain.items()})
        metrics["speedup"] = fast["img_per_s"] / plain["img_per_s"]
    return metrics, {"images": len(dataset), "transform": "RandomResizedCrop(scale 0.2-1, bicubic)+flip+normalize",
                     "transforms": {name: desc for name, (_, desc) in transforms.items()},
                     "decode_draft": draft_size(img_size), "step_img_per_s": step_img_per_s}


# ---------------------------------------------------------------------------- entry point
def _check_args(mode: str, steps: int, batch, warmup: int, workers, peak_tflops) -> None:
    if mode in ("train", "forward"):
        raise MimbenchError(f"`mimbench bench {mode} --preset ...` was replaced by the bench modes "
                            f"{', '.join(modes())}.",
                            "Use e.g. `mimbench bench pretrain --config pretrain/configs/mae_tiny_fmnist.py "
                            "--set model.name=mae_vit_tiny_patch4_32 --compare`.")
    if mode not in modes():
        raise MimbenchError(f"Unknown bench mode {mode!r}.", f"Choose one of: {', '.join(modes())}.")
    _check_positive(steps=steps, batch=batch, workers=workers)
    if int(warmup) < 0:
        raise MimbenchError(f"--warmup {warmup} is negative.", "Pass 0 or more warm-up steps.")
    if peak_tflops is not None and not float(peak_tflops) > 0:
        raise MimbenchError(f"--peak-tflops {peak_tflops} must be > 0.", "Pass the device's peak in TFLOP/s.")


def _device(device: str | None) -> torch.device:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MimbenchError(f"--device {device} was asked for, but no CUDA device is available.", "Use --device cpu.")
    return dev


def _load(mode: str, config, overrides) -> tuple[Path | None, object]:
    """(config path, loaded config) of ``mode``: the given config or the mode's default, checked against the
    schema of its kind (``data`` without a config: none)."""
    task = _bench_tasks().get(mode)
    if config is not None:
        path = resolve_config(config)
    elif mode == "data":
        return None, None
    else:
        path = eval_config(task.demo_config) if task else resolve_config(PRETRAIN_CONFIG)
    kind = task.kind if task else "pretrain"
    return path, load_config(path, list(overrides), kind=kind)


def _run_data(data, cfg, *, batch, steps, warmup, workers, compare, step_img_per_s=None) -> tuple[dict, dict, dict]:
    """metrics, protocol fields and dataset of ``bench data``."""
    n_workers = int(workers or default_workers())
    size = int(cfg.data.img_size) if cfg is not None else DATA_IMG_SIZE
    b = int(batch or 64)
    metrics, info = _bench_data(data, img_size=size, batch=b, steps=int(steps), warmup=int(warmup),
                                workers=n_workers, compare=compare, step_img_per_s=step_img_per_s)
    protocol = dict(batch=b, img_size=size, workers=n_workers, precision=None, **info)
    return metrics, protocol, {"name": str(data), "root": str(Path(data).resolve()), "sizes": {"train": info["images"]}}


def _path_metrics(times: dict, peaks: dict, flops: int, batch: int, peak, device) -> dict:
    """Per path (fast, plain_): step-time summary, TFLOP/s, MFU, peak memory; then FLOPs/img and the ratios."""
    metrics = {}
    for name, prefix in (("fast", ""), ("plain", "plain_")):
        if name not in times:
            continue
        summary = _summary(times[name], batch)
        achieved = flops / (summary["step_ms_median"] / 1000) / 1e12
        summary.update(tflops=achieved, mfu=achieved / peak if peak else None,
                       peak_mem_mb_per_img=peaks[name] / batch / 2**20 if device.type == "cuda" else None)
        metrics.update({prefix + k: v for k, v in summary.items()})
    metrics["flops_per_img"] = flops / batch
    if "plain" in times:
        metrics["speedup"] = metrics["img_per_s"] / metrics["plain_img_per_s"]
        # Each round ran both paths back to back: the median of the per-round ratios is the
        # figure least moved by load that changes during the run.
        metrics["speedup_paired"] = statistics.median(p / f for f, p in zip(times["fast"], times["plain"]))
    return metrics


def _builder(mode: str):
    if mode == "pretrain":
        return pretrain_step
    task = _bench_tasks()[mode]
    return resolve(task.bench_step, task.name)


def _batch(mode: str, cfg, batch: int | None) -> int:
    if batch:
        return int(batch)
    return int(_dotted(cfg, "optim.batch_size" if mode == "pretrain" else _bench_tasks()[mode].bench_batch))


def _config_amp(mode: str, cfg) -> str:
    """The config's ``runtime.amp``, as its evaluation reads it (a segmentation config has none: the schema's
    default, :func:`mimbench.evals.runner.runtime_value`)."""
    return str(runtime_value(cfg, "pretrain" if mode == "pretrain" else _bench_tasks()[mode].kind, "amp"))


def step_workload(mode: str, cfg, model, img_size: int) -> Workload | None:
    """The timed step's workload for ``amp="auto"``: a pre-training model's (:func:`pretrain.main.pretrain_workload`),
    else the first ViT inside ``model`` (a module with a patch embedding and a list of blocks) at ``img_size``,
    training for the finetune and segment steps; None where no ViT is found."""
    if mode == "pretrain":
        return pretrain_workload(model, cfg)
    for module in model.modules():
        embed = getattr(module, "patch_embed", None)
        blocks = getattr(module, "blocks", None) or getattr(module, "layers", None)
        convs = [m for m in embed.modules() if isinstance(m, torch.nn.Conv2d)] if embed is not None else []
        if convs and isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)):  # timm ViT: Sequential
            arch = {"embed_dim": convs[0].out_channels, "depth": len(blocks), "img_size": img_size,
                    "patch_size": convs[0].kernel_size[0]}
            return Workload.of_arch(arch, train=mode in ("finetune", "segment"))
    return None


class _Autocast:
    """An autocast factory whose precision is set once the step's model exists (the rule needs its workload)."""

    def __init__(self, device):
        self.device, self.factory = device, autocast_factory("none", device)

    def set(self, precision: str) -> None:
        self.factory = autocast_factory(precision, self.device)

    def __call__(self):
        return self.factory()


def _build_fast(mode, cfg, b, dev, amp_setting: str, encoder, arch):
    """(model, fast step, info, precision choice): the step built, then its precision chosen for its workload."""
    autocast = _Autocast(dev)
    model, fast_step, info = _builder(mode)(cfg, b, dev, True, autocast, encoder, arch)
    choice = precision_choice(amp_setting, dev, step_workload(mode, cfg, model, int(info["img_size"])))
    if choice.precision == "fp16":
        raise MimbenchError("bench measures bf16 or fp32; amp='fp16' needs a grad scaler it does not model.",
                            "Pass --amp bf16 or --amp none.")
    autocast.set(choice.precision)
    match_attention(model, choice.precision, dev)
    return model, fast_step, info, choice


def _run_step(mode, cfg, dev, *, batch, steps, warmup, compare, peak_tflops, encoder, arch, amp,
              compile) -> tuple[dict, dict]:
    """metrics and protocol fields of a step mode: fast path (and plain path) timed, FLOPs counted."""
    b = _batch(mode, cfg, batch)
    amp_setting = amp or _config_amp(mode, cfg)
    if str(amp_setting) == "fp16":
        raise MimbenchError("bench measures bf16 or fp32; amp='fp16' needs a grad scaler it does not model.",
                            "Pass --amp bf16 or --amp none.")
    use_compile = bool(compile if compile is not None else (mode == "pretrain" and cfg.runtime.compile))
    build = _builder(mode)
    model, fast_step, info, choice = _build_fast(mode, cfg, b, dev, str(amp_setting), encoder, arch)
    precision = choice.precision
    # One eager step, which also serves as a warm-up step. FlopCounterMode has no formula for the
    # CPU fused-attention kernel, so the count runs on the explicit path (same FLOPs).
    set_fused_attention(model, False)
    flops = count_flops(fast_step)
    fused = match_attention(model, precision, dev)
    maybe_compile(model, use_compile)
    paths = {"fast": fast_step}
    if compare:
        paths["plain"] = build(cfg, b, dev, False, autocast_factory("none", dev), encoder, arch)[1]
    times, peaks = time_paths(paths, steps=int(steps), warmup=int(warmup), device=dev)
    peak = float(peak_tflops) if peak_tflops else known_peak_tflops(dev)
    protocol = dict(batch=b, precision=precision, precision_reason=choice.reason, amp=str(amp_setting),
                    compile=use_compile, fused_attention=fused, peak_tflops=peak, **info)
    if arch or (encoder is None and mode != "pretrain"):
        protocol["arch"] = arch or DEFAULT_ARCH
    return _path_metrics(times, peaks, flops, b, peak, dev), protocol


#: The precisions ``--amp calibrate`` times (fp16 would need the grad scaler the steps do not model).
CALIBRATE_CANDIDATES = ("none", "bf16")


def _fast_step_in(precision: str, mode, cfg, b, dev, encoder, arch):
    """The fast path's step of ``mode`` in ``precision`` (its attention kernel the one that precision takes)."""
    model, step, _ = _builder(mode)(cfg, b, dev, True, autocast_factory(precision, dev), encoder, arch)
    match_attention(model, precision, dev)
    return step


def _run_calibrate(mode, cfg, dev, *, batch, steps, warmup, encoder, arch) -> tuple[dict, dict]:
    """``--amp calibrate``: the fast path in each of :data:`CALIBRATE_CANDIDATES`, interleaved step by step; what
    "auto" picks for this workload beside the fastest candidate. Informational: no default changes."""
    b = _batch(mode, cfg, batch)
    model, _, info, auto = _build_fast(mode, cfg, b, dev, "auto", encoder, arch)
    del model
    paths = {p: _fast_step_in(p, mode, cfg, b, dev, encoder, arch) for p in CALIBRATE_CANDIDATES}
    times, _ = time_paths(paths, steps=int(steps), warmup=int(warmup), device=dev)
    metrics = {}
    for p in CALIBRATE_CANDIDATES:
        metrics.update({f"{p}_{k}": v for k, v in _summary(times[p], b).items()})
    fastest = max(CALIBRATE_CANDIDATES, key=lambda p: metrics[f"{p}_img_per_s"])
    metrics["auto_vs_fastest"] = metrics[f"{auto.precision}_img_per_s"] / metrics[f"{fastest}_img_per_s"]
    protocol = dict(batch=b, amp="calibrate", candidates=list(CALIBRATE_CANDIDATES), fastest=fastest,
                    precision=auto.precision, precision_reason=auto.reason, compile=False, **info)
    if arch or (encoder is None and mode != "pretrain"):
        protocol["arch"] = arch or DEFAULT_ARCH
    return metrics, protocol


def run_bench(mode: str, *, config: str | Path | None = None, overrides=(), device: str | None = None,
              steps: int = 10, batch: int | None = None, warmup: int = 3, compare: bool = False,
              peak_tflops: float | None = None, encoder: str | Path | None = None, arch: str | None = None,
              data: str | None = None, workers: int | None = None, amp: str | None = None,
              compile: bool | None = None, out: str | Path = "runs/bench", step_img_per_s: float | None = None) -> dict:
    """Benchmark ``mode`` (see the module docstring; :func:`modes`) and write a ``bench`` run record into
    ``out``; returns the record. ``config`` defaults to the task's demo config (``pretrain``:
    :data:`PRETRAIN_CONFIG`). ``step_img_per_s`` (``data``): a model step's img/s, for the workers it needs."""
    _check_args(mode, steps, batch, warmup, workers, peak_tflops)
    started = time.time()
    dev = _device(device)
    encoder = Path(encoder) if encoder else None
    if encoder is not None:
        check_encoder_file(encoder)
    if amp == "calibrate" and mode == "data":
        raise MimbenchError("--amp calibrate times a model step; bench data has none.", "Leave --amp out for bench data.")
    cfg_path, cfg = _load(mode, config, overrides)
    protocol = {"name": f"bench-{mode}", "sha256": config_sha256(cfg) if cfg is not None else None,
                "config": str(cfg_path) if cfg_path else None, "overrides": list(overrides), "mode": mode,
                "steps": int(steps), "warmup": int(warmup), "compare": bool(compare),
                "plain_path": (PLAIN if mode != "data" else "0 workers (main process)") if compare else None,
                "interleaved": mode != "data"}
    if amp == "calibrate" and mode != "data":
        metrics, fields = _run_calibrate(mode, cfg, dev, batch=batch, steps=steps, warmup=warmup, encoder=encoder,
                                         arch=arch)
        dataset = {"name": "random", "root": None, "sizes": {}}
    elif mode == "data":
        metrics, fields, dataset = _run_data(data, cfg, batch=batch, steps=steps, warmup=warmup, workers=workers,
                                             compare=compare, step_img_per_s=step_img_per_s)
    else:
        metrics, fields = _run_step(mode, cfg, dev, batch=batch, steps=steps, warmup=warmup, compare=compare,
                                    peak_tflops=peak_tflops, encoder=encoder, arch=arch, amp=amp, compile=compile)
        dataset = {"name": "random", "root": None, "sizes": {}}
    protocol.update(fields)
    if dev.type == "cpu":
        metrics["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {k: v for k, v in metrics.items() if v is not None}
    record = new_record("bench", protocol=protocol, encoder=encoder_summary(encoder) if encoder else None,
                        dataset=dataset, metrics=metrics, seed=0, started=started, finished=time.time())
    record["path"] = str(write_record(out, record))
    return record


def _calibrate_lines(p: dict, m: dict) -> list[str]:
    """The ``--amp calibrate`` lines: each candidate's img/s, the fastest, what "auto" picks and why."""
    if p.get("amp") != "calibrate":
        return []
    lines = [f"  {c:>5}: {m[c + '_img_per_s']:.1f} img/s, step {m[c + '_step_ms_median']:.1f} ms "
             f"(IQR {m[c + '_step_ms_iqr']:.1f})" for c in p["candidates"]]
    lines.append(f"  fastest here: {p['fastest']}; amp=auto picks {p['precision']} ({p['precision_reason']}), "
                 f"{100 * m['auto_vs_fastest']:.0f} % of the fastest. Nothing was changed: pass --amp "
                 f"{p['fastest']} (or set runtime.amp) to use the fastest.")
    return lines


def _data_lines(p: dict, m: dict) -> list[str]:
    """``bench data``: decode img/s (full / downscaled), then per transform augment and per-worker img/s."""
    if "decode_img_per_s" not in m:
        return []
    lines = [f"  decode: {m['decode_img_per_s']:.1f} img/s in full, {m['draft_decode_img_per_s']:.1f} img/s "
             f"downscaled to >= {p['decode_draft']} px (PIL draft, {m['draft_decode_speedup']:.2f}x)"]
    for name in p["transforms"]:
        need = m.get(f"{name}_workers_needed")
        lines.append(f"  {name:>8}: augment {m[f'{name}_augment_img_per_s']:.1f} img/s, one worker "
                     f"{m[f'{name}_per_worker_img_per_s']:.1f} img/s (downscaled decode "
                     f"{m[f'{name}_draft_per_worker_img_per_s']:.1f})"
                     + (f"; {need} workers for {p['step_img_per_s']:.0f} img/s of model step "
                        f"({m[f'{name}_draft_workers_needed']} downscaled)" if need else ""))
    return lines


def format_bench(record: dict) -> str:
    """Human-readable summary of a bench record (one line per path, then the ratio)."""
    p, m = record["protocol"], record["metrics"]
    hw = record["hardware"]
    head = (f"bench {p['mode']} batch={p['batch']} device={hw['device']} ({hw.get('name')}, "
            f"{hw.get('threads', torch.get_num_threads())} threads) precision={p.get('precision') or 'n/a'}"
            + (f" compile={p['compile']}" if "compile" in p else ""))
    lines = [head]
    for prefix, label in (("", "fast "), ("plain_", "plain")):
        if f"{prefix}img_per_s" not in m:
            continue
        line = (f"  {label}: {m[prefix + 'img_per_s']:.1f} img/s, step {m[prefix + 'step_ms_median']:.1f} ms "
                f"(min {m[prefix + 'step_ms_min']:.1f}, max {m[prefix + 'step_ms_max']:.1f}, "
                f"IQR {m[prefix + 'step_ms_iqr']:.1f})")
        if f"{prefix}img_per_s_per_worker" in m:
            line += f", {m[prefix + 'img_per_s_per_worker']:.1f} img/s per worker ({m[prefix + 'workers']} workers)"
        if f"{prefix}tflops" in m:
            tf = m[prefix + "tflops"]
            line += f", {tf:.2f} TFLOP/s" if tf >= 1 else f", {1000 * tf:.2f} GFLOP/s"
        if f"{prefix}mfu" in m:
            line += f", MFU {100 * m[prefix + 'mfu']:.1f} %"
        if f"{prefix}peak_mem_mb_per_img" in m:
            line += f", peak {m[prefix + 'peak_mem_mb_per_img']:.2f} MiB/img"
        lines.append(line)
    lines.extend(_calibrate_lines(p, m))
    lines.extend(_data_lines(p, m))
    if "flops_per_img" in m:
        lines.append(f"  FLOPs/img: {m['flops_per_img'] / 1e9:.3f} G")
    if "speedup" in m:
        paired = f", median of per-round ratios {m['speedup_paired']:.2f}x" if "speedup_paired" in m else ""
        how = "interleaved in one process" if p.get("interleaved") else "one after the other"
        lines.append(f"  ratio fast/plain: {m['speedup']:.2f}x{paired} ({how})")
    if "process_peak_rss_mb" in m:
        lines.append(f"  process peak RSS: {m['process_peak_rss_mb']:.0f} MiB")
    lines.append(f"  record: {record.get('path')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- suites
#: ``mimbench bench --suite gpu``: (row, mode, run_bench arguments) at full size, all bf16 on the GPU.
GPU_SUITE = (
    ("MAE ViT-B/16 pre-training", "pretrain", dict(config="pretrain/configs/mae_vit-b_in1k_1600ep.py", batch=256,
                                                   compile=False)),
    ("MAE ViT-B/16 pre-training, compiled", "pretrain", dict(config="pretrain/configs/mae_vit-b_in1k_1600ep.py",
                                                             batch=256, compile=True)),
    ("MAE ViT-L/16 pre-training", "pretrain", dict(config="pretrain/configs/mae_vit-l_in1k_1600ep.py", batch=128,
                                                   compile=False)),
    ("MAE ViT-L/16 pre-training, compiled", "pretrain", dict(config="pretrain/configs/mae_vit-l_in1k_1600ep.py",
                                                             batch=128, compile=True)),
    ("ViT-B/16 linear-probe features", "features", dict(arch="vit_base_patch16_224", batch=256)),
    ("ViT-B/16 fine-tune step", "finetune", dict(arch="vit_base_patch16_224", batch=64,
                                                 config="eval_configs/finetune/mae_vit-b_in1k.py")),
    ("UperNet ViT-B/16 segmentation step", "segment",
     dict(config="eval_configs/segmentation/upernet_vit-b_ade20k_512x512_160k.py", batch=2)),
)
#: The same rows at toy size (``--device cpu``: a test of the suite itself, numbers meaningless): the micro MAE
#: config, a 4-block 32x32 encoder file, the demo configs; compiled rows only where the device is CUDA.
TOY_PRETRAIN = "pretrain/configs/mae_micro_fmnist.py"
SUITE_HEADING = "## GPU suite results"


def _toy_args(mode: str, args: dict, encoder: Path) -> dict:
    if mode == "pretrain":
        return dict(config=TOY_PRETRAIN, batch=4, compile=bool(args.get("compile")))
    return dict(encoder=encoder, batch=2)


def run_suite(suite: str, *, device: str | None = None, steps: int = 10, warmup: int = 3, toy: bool = False,
              out: str | Path = "runs/bench", append: str | Path | None = None) -> list[tuple[str, dict]]:
    """Run every row of ``suite`` (``gpu``: :data:`GPU_SUITE`) in bf16 and return ``(row, bench record)`` pairs;
    with ``append``, add one table row per record to that Markdown file under :data:`SUITE_HEADING` (device name,
    img/s, MFU, peak memory per image, command). ``toy``: the rows at toy size (a CPU test of the suite)."""
    if suite != "gpu":
        raise MimbenchError(f"Unknown bench suite {suite!r}.", "Use --suite gpu.")
    dev = _device(device)
    rows, encoder = [], None
    if toy:
        from mimbench.testing import write_tiny_encoder  # test-size encoder file, only for the toy suite

        Path(out).mkdir(parents=True, exist_ok=True)
        encoder = write_tiny_encoder(Path(out) / "suite-toy-encoder.safetensors", depth=4)
    for row, mode, args in GPU_SUITE:
        kwargs = _toy_args(mode, args, encoder) if toy else dict(args)
        if kwargs.get("compile") and dev.type != "cuda":
            continue  # compiling on the CPU takes minutes: scripts/gpu_check.sh runs it on a GPU
        record = run_bench(mode, device=str(dev), steps=steps, warmup=warmup, amp="bf16", out=out, **kwargs)
        rows.append((row, record))
        print(f"{row}\n{format_bench(record)}", flush=True)
    if append is not None:
        append_suite_rows(Path(append), rows)
    return rows


def suite_row(row: str, record: dict) -> str:
    """One Markdown table row of a suite record."""
    p, m, hw = record["protocol"], record["metrics"], record["hardware"]
    mfu = f"{100 * m['mfu']:.1f} %" if m.get("mfu") is not None else "n/a"
    mem = f"{m['peak_mem_mb_per_img']:.1f}" if m.get("peak_mem_mb_per_img") is not None else "n/a"
    what = f" --config {p['config']}" if p.get("config") else f" --arch {p['arch']}" if p.get("arch") else ""
    command = f"mimbench bench {p['mode']}{what} --batch {p['batch']} --amp bf16" + (" --compile" if p.get("compile") else "")
    return (f"| {record['started'][:10]} | {hw.get('name')} | {row} | {p['batch']} | {p['precision']} | "
            f"{bool(p.get('compile'))} | {m['img_per_s']:.1f} | {mfu} | {mem} | `{command}` |")


SUITE_HEADER = ("| date | device | row | batch | precision | compile | img/s | MFU | peak MiB/img | command |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")


def append_suite_rows(path: Path, rows: list[tuple[str, dict]]) -> None:
    """Add the rows to the table under :data:`SUITE_HEADING` in ``path`` (the section is created at the end once;
    later rows go after its last line, before the next section)."""
    text = path.read_text() if path.exists() else ""
    if SUITE_HEADING not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"{SUITE_HEADING}\n\n{SUITE_HEADER}"
    start = text.index(SUITE_HEADING)
    nxt = text.find("\n## ", start + len(SUITE_HEADING))
    end = len(text) if nxt < 0 else nxt + 1
    section = text[start:end].rstrip("\n") + "\n" + "".join(suite_row(r, rec) + "\n" for r, rec in rows)
    path.write_text(text[:start] + section + ("\n" + text[end:] if end < len(text) else ""))
