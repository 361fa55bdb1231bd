"""Semantic segmentation evaluation: an encoder file as the backbone of mmseg's UperNet.

The protocol is the mmseg config (``eval_configs/segmentation/``); this module only
plugs the encoder in and runs mmengine's ``Runner``:

1. the encoder is converted to mmseg ``MAE`` backbone keys (``BEiT`` for BEiT encoders without
   absolute position embeddings, ``MAEStyleEva`` -- timm's own blocks -- for Eva encoders;
   ``mimbench.seg.backbone``) and loaded through the backbone's ``init_cfg=Pretrained``;
2. the backbone architecture fields come from the encoder; where they differ from the
   config (a non-ViT-B encoder), the dependent widths (neck, heads), the layer-decay depth
   and the tapped blocks (``out_indices`` scaled to the same relative depths) follow, and
   every such change is written to the record's ``protocol.deviations``;
3. on a machine without CUDA, ``AmpOptimWrapper`` (CUDA-only in mmengine) becomes a plain
   fp32 ``OptimWrapper`` -- also listed as a deviation;
4. before training, every annotation map is checked to hold only labels the config's classes
   allow (a bad label otherwise surfaces as an index error, or a CUDA device assert, mid-run);
5. the evaluation data is defined once (:func:`share_eval_data`): ``test_dataloader`` /
   ``test_evaluator``, which the validation mmengine runs during and at the end of training reads
   too; a ``--set`` of either ``val_`` or ``test_`` key reaches both;
6. validation and test run in the training's precision (:func:`match_eval_precision`: fp16
   autocast after fp16 AMP training, else fp32), recorded as ``protocol.eval_precision`` next to
   the training's ``hardware.precision``;
7. after training, the single-scale evaluation (the config's test mode) gives aAcc/mIoU/mAcc and
   the per-class IoU, in percent: the validation after the last iteration when the config has one
   (the same model, data, metric and precision as the test, so its metrics are reported and the test
   loop does not run them again; :class:`mimbench.seg.metrics.FinalValidationHook`), else the test
   loop; with ``aug_test`` (default: when the config defines ``tta_model``/``tta_pipeline``, as the
   ADE20K protocol does) the trained model is tested again with mmseg's ``SegTTAModel`` over the
   multi-scale + flip pipeline, giving ``mIoU_ms`` etc. Both go into one ``segment`` record in ``out``.

:func:`run_segment` reads top to bottom: start (config, processes) -> evaluation data once -> inputs
checked -> shared files (data, backbone weights) -> the config fitted to encoder and job
(:func:`fit_config`) -> precision, labels, runner settings -> :func:`train_and_test` -> record.

Processes: the launcher is taken from the environment (``launcher="auto"``, the default): under
``torchrun`` mmengine's ``pytorch`` launcher, under ``srun`` without torchrun its ``slurm`` one,
else ``none``; the process group is the one :func:`mimbench.dist.setup` created, which mmengine's
Runner then uses. Under several processes on GPUs SyncBN stays SyncBN. Single-process runs turn
SyncBN layers into BatchNorm (mmengine does this when it wraps the model), and so do multi-process
runs on CPUs (torch's SyncBatchNorm needs a GPU); the record lists either as a deviation, since
batch statistics are then taken over one process's images only. The built-in data and the backbone
checkpoint are written by rank 0 (the others wait); the record is written by rank 0 only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimbench import dist, trackers
from mimbench.config import config_sha256, parse_override
from mimbench.data.seg import build_fashion_mnist_seg, check_ade20k_layout
from mimbench.encoders import read_metadata
from mimbench.errors import MimbenchError
from mimbench.evals import runner as evals
from mimbench.evals.tasks import BUILTIN_SEG_DATA as BUILTIN_SEG
from mimbench.evals.tasks import LAUNCHERS


def _resolve_data(data: str, out: Path) -> tuple[Path, str]:
    """(ADE20K-layout root, dataset name) for a path (checked by :func:`check_ade20k_layout`) or the built-in spec."""
    if data == BUILTIN_SEG:
        return Path(build_fashion_mnist_seg(out / "data" / "fashion-mnist-seg")), "fashion-mnist-seg"
    if data.startswith("builtin:"):
        raise MimbenchError(f"Unknown built-in segmentation dataset {data!r}.",
                            f"Use {BUILTIN_SEG} or the path of an ADE20K-layout root.")
    root = check_ade20k_layout(data)
    return root, "ade20k" if "ade" in root.name.lower() else root.name


def scaled_out_indices(out_indices, config_depth: int, depth: int) -> list[int]:
    """Blocks at the same relative depths, e.g. [3, 5, 7, 11] of 12 -> [7, 11, 15, 23] of 24."""
    scaled = [round((i + 1) * depth / config_depth) - 1 for i in out_indices]
    if len(set(scaled)) != len(scaled) or min(scaled) < 0:
        raise MimbenchError(
            f"A {depth}-block encoder is too shallow for the config's {len(out_indices)} tapped blocks {list(out_indices)}.",
            "Use a deeper encoder or set model.backbone.out_indices (and num_layers) with --set.",
        )
    return scaled


def adapt_config(cfg, fields: dict, *, cuda: bool) -> list[str]:
    """Fit ``cfg`` (mmengine Config, changed in place) to the encoder; return the deviations made."""
    deviations = []
    backbone = cfg.model.backbone
    for key in ("type", "patch_size", "embed_dims", "num_heads", "mlp_ratio", "norm_cfg") + \
            (("tokens",) if "tokens" in fields else ()):  # MAEStyleViT: the encoder's prefix tokens
        if backbone.get(key) != fields[key]:
            deviations.append(f"model.backbone.{key}: {backbone.get(key)} -> {fields[key]} (from the encoder)")
            backbone[key] = fields[key]
    depth = fields["num_layers"]
    if backbone.num_layers != depth:
        new_idx = scaled_out_indices(backbone.out_indices, backbone.num_layers, depth)
        deviations.append(f"model.backbone.num_layers: {backbone.num_layers} -> {depth}, "
                          f"out_indices {list(backbone.out_indices)} -> {new_idx} (same relative depths)")
        backbone.num_layers, backbone.out_indices = depth, new_idx
    backbone.img_size = fields["img_size"]
    if "eva" in fields:  # an Eva-family encoder: its timm settings travel to the backbone
        backbone.eva = fields["eva"]
    dim = fields["embed_dims"]
    if cfg.model.get("neck") and cfg.model.neck.get("embed_dim") not in (None, dim):
        cfg.model.neck.embed_dim = dim
        cfg.model.decode_head.in_channels = [dim] * len(cfg.model.decode_head.in_channels)
        if cfg.model.get("auxiliary_head"):
            cfg.model.auxiliary_head.in_channels = dim
        deviations.append(f"neck/head input widths -> {dim} (encoder width)")
    paramwise = cfg.optim_wrapper.get("paramwise_cfg") or {}
    if "num_layers" in paramwise and paramwise["num_layers"] != depth:
        deviations.append(f"optim_wrapper.paramwise_cfg.num_layers: {paramwise['num_layers']} -> {depth}")
        cfg.optim_wrapper.paramwise_cfg.num_layers = depth
    if cfg.optim_wrapper.get("type") == "AmpOptimWrapper" and not cuda:
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
        deviations.append("optim_wrapper: AmpOptimWrapper -> OptimWrapper (fp32; no CUDA device)")
    return deviations


def follow_max_iters(cfg, overrides) -> list[str]:
    """A ``--set train_cfg.max_iters=N`` also moves the end of the last iteration scheduler to N.

    In mmengine configs the schedulers' ``end`` is a number written when the file was read, so
    shortening or lengthening the run alone would leave the poly decay ending elsewhere (at the old
    160k, the learning rate would never come down; past an earlier end it would sit at 0). Not done
    when the overrides also touch ``param_scheduler``, or when the run ends before that scheduler
    begins (e.g. a few-iteration smoke run inside the warm-up). Returns the change made, for the record.
    """
    keys = [parse_override(o)[0] for o in overrides]
    if "train_cfg.max_iters" not in keys or any(k.startswith("param_scheduler") for k in keys):
        return []
    scheds = cfg.get("param_scheduler")
    scheds = [scheds] if isinstance(scheds, dict) else list(scheds or [])
    by_iter = [s for s in scheds if s.get("by_epoch") is False and isinstance(s.get("end"), int)]
    if not by_iter:
        return []
    last = max(by_iter, key=lambda s: s["end"])
    max_iters = int(cfg.train_cfg.max_iters)
    if last["end"] == max_iters:
        return []
    if (last.get("begin") or 0) >= max_iters:  # the run ends before that scheduler starts (a smoke test): nothing to move
        return []
    change = f"param_scheduler {last['type']} end: {last['end']} -> {max_iters} (follows train_cfg.max_iters)"
    last["end"] = max_iters
    return [change]


def _set_data_root(cfg, root: Path) -> None:
    cfg.data_root = str(root)
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(name)
        if loader is not None:
            loader.dataset.data_root = str(root)


def check_labels(cfg) -> dict:
    """Scan every annotation map of the train and test datasets; raise on a label the classes do not allow.

    Allowed: ``0..num_classes-1`` and 255 (ignore); with ``reduce_zero_label`` (ADE20K) the maps hold
    ``0..num_classes`` (0 = "other", ignored; k -> class k-1). Returns ``{split: files checked}``.
    """
    from mmseg.registry import DATASETS  # mimbench.seg loads mmseg: imported when a run starts

    checked = {}
    for name in ("train_dataloader", "test_dataloader"):
        loader = cfg.get(name)
        if loader is None:
            continue
        dataset_cfg = dict(loader.dataset, pipeline=[], lazy_init=False)
        dataset = DATASETS.build(dataset_cfg)
        reduce_zero = bool(getattr(dataset, "reduce_zero_label", False))
        for step in loader.dataset.get("pipeline") or []:
            if step.get("type") == "LoadAnnotations" and step.get("reduce_zero_label") is not None:
                reduce_zero = bool(step["reduce_zero_label"])
        num_classes = len(dataset.metainfo["classes"])
        highest = num_classes if reduce_zero else num_classes - 1
        bad = []
        for i in range(len(dataset)):
            path = dataset.get_data_info(i)["seg_map_path"]
            with Image.open(path) as im:
                present = np.flatnonzero(np.bincount(np.asarray(im).ravel(), minlength=256))
            wrong = [int(v) for v in present if highest < v < 255]
            if wrong:
                bad.append(f"{path} (labels {wrong[:5]})")
        if bad:
            raise MimbenchError(
                f"{len(bad)} annotation map(s) of {name.split('_')[0]} hold labels above {highest} "
                f"({num_classes} classes{', reduce_zero_label' if reduce_zero else ''}; 255 = ignore): "
                + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
                "Fix or remove those maps, or use a config whose dataset has that many classes.",
            )
        checked[name.split("_")[0]] = len(dataset)
    return checked


def _metric_type_with_per_class(evaluator):
    """Swap mmseg's IoUMetric for the subclass that also returns per-class IoU (same summary values)."""
    if isinstance(evaluator, dict) and evaluator.get("type") in ("IoUMetric", "mmseg.IoUMetric"):
        evaluator["type"] = "PerClassIoUMetric"
    return evaluator


def _has_sync_bn(node) -> bool:
    if isinstance(node, dict):
        return node.get("type") in ("SyncBN", "MMSyncBN") or any(_has_sync_bn(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_sync_bn(v) for v in node)
    return False


def _test_multi_scale(runner, cfg, *, fp16: bool) -> dict:
    """Test the trained model again under mmseg's SegTTAModel with the config's multi-scale + flip pipeline
    (under fp16 autocast with ``fp16``, as mmengine's test loop)."""
    from mmengine.model import is_model_wrapper
    from mmengine.runner.amp import autocast
    from mmseg.registry import MODELS

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    tta = MODELS.build(dict(copy.deepcopy(cfg.tta_model), module=model))
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.dataset.pipeline = copy.deepcopy(cfg.tta_pipeline)
    loader = runner.build_dataloader(loader_cfg, seed=runner.seed)
    evaluator = runner.build_evaluator(copy.deepcopy(cfg.test_evaluator))  # already the per-class metric
    evaluator.dataset_meta = loader.dataset.metainfo
    tta.eval()
    with torch.no_grad(), autocast(enabled=fp16):
        for batch in loader:
            evaluator.process(data_samples=tta.test_step(batch), data_batch=batch)
    return evaluator.evaluate(len(loader.dataset))


def _numeric(metrics: dict) -> dict[str, float]:
    """Scalar metrics as floats (IoUMetric returns numpy scalars, in percent)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _backbone_fields(encoder: Path, img_size: int, layout: str = "auto") -> dict:
    """The mmseg backbone fields of ``encoder`` at crop ``img_size`` (as ``write_backbone_checkpoint`` returns)."""
    from mimbench.seg.backbone import backbone_cfg_from_metadata  # mimbench.seg loads mmseg: only when a run starts

    return backbone_cfg_from_metadata(read_metadata(encoder, layout=layout), img_size)


def replace_sync_bn(node) -> None:
    """SyncBN / MMSyncBN norm configs -> BN, in place (any depth of a model config)."""
    if isinstance(node, dict):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
        for value in node.values():
            replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            replace_sync_bn(value)


def _precision(optim_wrapper) -> str:
    """bf16 | fp16 | none (fp32): what mmengine's optimizer wrapper computes in."""
    if optim_wrapper.get("type") != "AmpOptimWrapper":
        return "none"
    return "bf16" if str(optim_wrapper.get("dtype")) in ("bfloat16", "torch.bfloat16") else "fp16"


def match_eval_precision(cfg) -> str:
    """Validation and test under the precision training computes in; returns it (fp16 | none).

    With fp16 AMP training (the ADE20K configs on a GPU) mmengine's ``ValLoop``/``TestLoop`` run under fp16
    autocast (their ``fp16=True``), as mmseg 0.x tested an ``fp16`` config; the multi-scale test follows.
    mmengine's loops have no bf16 autocast, so after bf16 or fp32 training they run in fp32 ("none").
    """
    fp16 = _precision(cfg.optim_wrapper) == "fp16"
    for name in ("val_cfg", "test_cfg"):
        if cfg.get(name) is not None:
            cfg[name].fp16 = fp16
    return "fp16" if fp16 else "none"


#: mmengine's (validation, test) names of the evaluation data and metric.
EVAL_PAIRS = (("val_dataloader", "test_dataloader"), ("val_evaluator", "test_evaluator"))


def _in_both(key: str) -> list[str]:
    """An override key of either copy of the evaluation data, for both copies (else no key)."""
    head, dot, rest = key.partition(".")
    return next(([name + dot + rest for name in pair] for pair in EVAL_PAIRS if head in pair), [])


def share_eval_data(cfg, overrides) -> None:
    """One definition of the evaluation data: ``test_dataloader`` / ``test_evaluator``.

    mmengine validates during and at the end of training with ``val_dataloader`` / ``val_evaluator`` and
    tests with the ``test_`` pair; the ADE20K configs write ``test_dataloader = val_dataloader``, but a loaded
    config holds two copies, so an override of one would leave the other as the file says. Here every
    ``--set`` of either copy is applied to both (in the order given, the last one winning), and the config
    must then define them alike (else MimbenchError). :func:`sync_eval_data` copies the ``test_`` pair, as
    this module then completes it (data root, per-class metric), over the ``val_`` pair before the Runner
    is built. A config without validation (``val_dataloader = None``) is left so.
    """
    if cfg.get("val_dataloader") is None:
        return
    both = {name: value for key, value in map(parse_override, overrides) for name in _in_both(key)}
    if both:
        cfg.merge_from_dict(both)
    for val, test in EVAL_PAIRS:
        if cfg.get(val) != cfg.get(test):
            raise MimbenchError(f"The config defines {val} and {test} differently; segmentation evaluates one "
                                "data set, during training and after it.",
                                f"Define the evaluation data once in the config: {val} = {test}.")


def sync_eval_data(cfg) -> None:
    """The validation pair becomes the test pair, as completed (see :func:`share_eval_data`)."""
    if cfg.get("val_dataloader") is None:
        return
    for val, test in EVAL_PAIRS:
        cfg[val] = copy.deepcopy(cfg[test])


def _check_launcher(launcher: str, ctx) -> str:
    """The mmengine launcher: ``auto`` read from the environment, else the one given if it fits the job."""
    if launcher == "auto":
        return ctx.launcher
    if (launcher == "none") != (ctx.world_size == 1):
        raise MimbenchError(f"--launcher {launcher} does not match this job of {ctx.world_size} process(es).",
                            "Leave --launcher at auto (the launcher is read from the torchrun / Slurm environment).")
    return launcher


def _check_inputs(cfg, data: str, config: Path) -> int:
    """The square crop side, after checking the built-in data goes with its dataset type."""
    dataset_type = cfg.train_dataloader.dataset.type
    if data == BUILTIN_SEG and dataset_type != "FashionMNISTSegDataset":
        raise MimbenchError(f"{BUILTIN_SEG} needs a FashionMNISTSegDataset config, {config} uses {dataset_type}.",
                            "Use eval_configs/segmentation/demo_fmnist_seg.py.")
    crop = tuple(cfg.crop_size)
    if crop[0] != crop[1]:
        raise MimbenchError(f"Non-square crop {crop}.", "Use a square crop_size in the config.")
    return crop[0]


def _shared_files(run, data: str, crop: int) -> tuple[Path, str]:
    """Data root and name; rank 0 writes the built-in data and the backbone checkpoint, the others wait."""
    from mimbench.seg.backbone import write_backbone_checkpoint  # mimbench.seg loads mmseg: imported when a run starts

    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        _resolve_data(data, run.out)
        write_backbone_checkpoint(run.encoder, run.out / "backbone_init.pth", crop, layout=run.layout)
    dist.barrier()
    return _resolve_data(data, run.out)  # the built-in set now exists: this only returns its path


def _process_deviations(cfg, launcher: str, cuda: bool) -> list[str]:
    """SyncBN and the DDP wrapper for this job's processes and devices; returns the deviations."""
    deviations = []
    if _has_sync_bn(cfg.model) and launcher == "none":
        deviations.append("SyncBN -> BatchNorm (one process: batch statistics over this process's images only)")
    elif _has_sync_bn(cfg.model) and not cuda:
        replace_sync_bn(cfg.model)
        deviations.append("SyncBN -> BatchNorm (CPU processes: torch's SyncBatchNorm needs a GPU; "
                          "batch statistics over each process's images only)")
    if launcher != "none" and not cuda:  # DDP of a CPU module takes no device ids (mmengine passes LOCAL_RANK)
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                     find_unused_parameters=bool(cfg.get("find_unused_parameters")))
    return deviations


def _resolve_aug_test(cfg, aug_test: bool | None, config: Path) -> bool:
    """Whether to test multi-scale + flip: by default when the config defines ``tta_model``/``tta_pipeline``."""
    has_tta = cfg.get("tta_model") is not None and cfg.get("tta_pipeline") is not None
    if aug_test and not has_tta:
        raise MimbenchError(f"{config} defines no tta_model/tta_pipeline, so there is no multi-scale test to run.",
                            "Leave out --aug-test, or use a config with a multi-scale + flip tta_pipeline.")
    return has_tta if aug_test is None else bool(aug_test)


def fit_config(run, root: Path, crop: int, launcher: str, cuda: bool) -> list[str]:
    """Data root, encoder-dependent widths, schedule end, SyncBN/DDP: the config as it runs; the deviations."""
    cfg = run.cfg
    _set_data_root(cfg, root)
    fields = _backbone_fields(run.encoder, crop, run.layout)
    deviations = run.deviations + adapt_config(cfg, fields, cuda=cuda) + follow_max_iters(cfg, run.overrides)
    deviations += _process_deviations(cfg, launcher, cuda)
    cfg.test_evaluator = _metric_type_with_per_class(cfg.test_evaluator)
    return deviations


def runner_settings(cfg, *, out: Path, launcher: str, resume: bool) -> None:
    """Backbone weights, seed, the project's hooks, work dir and launcher: what mmengine's Runner is built from."""
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(out / "backbone_init.pth"))
    randomness = dict(cfg.get("randomness") or {})
    if randomness.get("seed") is None:  # mmengine draws one otherwise: fix it so the record's seed is the one used
        cfg.randomness = dict(randomness, seed=0)
    # exact resume (seg.resume), a stop at the first non-finite loss (seg.safety), the final validation kept (seg.metrics)
    hooks = list(cfg.get("custom_hooks") or [])
    have = {h.get("type") for h in hooks}
    cfg.custom_hooks = hooks + [dict(type=t) for t in ("RngStateHook", "NonFiniteLossHook", "FinalValidationHook")
                                if t not in have]
    sync_eval_data(cfg)
    cfg.work_dir = str(out / "mmseg")
    trackers.add_to_runner_config(cfg, trackers.selected(cfg.get("runtime")), out)
    cfg.launcher = launcher
    cfg.resume = bool(resume)
    cfg.load_from = None


def train_and_test(cfg, *, aug_test: bool, fp16: bool) -> dict:
    """Train; then the single-scale metrics (the final validation's when it ran on the trained model, else a
    test run) and, with ``aug_test``, the multi-scale + flip ones as ``<name>_ms``."""
    from mmengine.runner import Runner  # mmengine/mmseg: imported when a run starts

    from mimbench.seg.metrics import FinalValidationHook, split_per_class

    runner = Runner.from_cfg(cfg)
    runner.train()
    final = FinalValidationHook.metrics_of(runner)
    metrics, per_class = split_per_class(_numeric(final if final is not None else runner.test()))
    if per_class:
        metrics["per_class_iou"] = per_class
    if aug_test:
        ms_metrics, _ = split_per_class(_numeric(_test_multi_scale(runner, cfg, fp16=fp16)))
        metrics.update({f"{k}_ms": v for k, v in ms_metrics.items()})
    return metrics


def run_segment(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
                launcher: str = "auto", resume: bool = False, aug_test: bool | None = None,
                layout: str = "auto") -> dict:
    """Train and test UperNet on ``data`` with ``encoder`` as backbone; write and return the record.

    ``launcher``: ``auto`` (from the environment: torchrun -> ``pytorch``, srun -> ``slurm``, else
    ``none``) or one of mmengine's ``none`` / ``pytorch`` / ``slurm``.
    ``resume``: continue from the last checkpoint in ``out/mmseg``.
    ``aug_test``: also test multi-scale + flip (None: when the config defines ``tta_model``).
    ``layout``: the checkpoint layout of ``encoder`` (``--from``; "auto" detects it).
    """
    import mimbench.seg  # noqa: F401  (mmseg: mmcv.ops fallback and the project's registrations, when a run starts)

    if launcher not in LAUNCHERS:
        raise MimbenchError(f"Unknown launcher {launcher!r}.", "Use auto, none, pytorch or slurm.")
    run = evals.start("segment", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg = run.cfg
    share_eval_data(cfg, overrides)
    protocol_sha = config_sha256(cfg)
    launcher = _check_launcher(launcher, run.ctx)
    crop = _check_inputs(cfg, data, config)
    root, dataset_name = _shared_files(run, data, crop)
    deviations = fit_config(run, root, crop, launcher, torch.cuda.is_available())
    aug_test = _resolve_aug_test(cfg, aug_test, config)
    eval_precision = match_eval_precision(cfg)
    check_labels(cfg)
    runner_settings(cfg, out=run.out, launcher=launcher, resume=resume)
    metrics = train_and_test(cfg, aug_test=aug_test, fp16=eval_precision == "fp16")
    run.deviations, run.seed = deviations, int(cfg.randomness.seed)
    return evals.finish(run, protocol={"sha256": protocol_sha, "test_mode": cfg.model.test_cfg.get("mode"),
                                        "multi_scale_test": aug_test, "eval_precision": eval_precision},
                        metrics=metrics, dataset={"root": str(root)}, name=dataset_name,
                        precision=_precision(cfg.optim_wrapper))
