"""The evaluation tasks: one table, one entry per task, read by every part of mimbench that names tasks.

An entry (:class:`Task`) says what runs the task (a ``module:function`` imported only when the task runs,
so that the mmseg stack behind ``segment`` is never loaded for a classification evaluation), which schema
kind its configs are, its demo and published-protocol configs, its default data, its ``mimbench eval``
subcommand (help, example, extra options), and what the pipelines need: the options of a pipeline step,
its demo budgets, whether the reproduce grids run it, and how ``mimbench bench`` times it.

Readers: the CLI (one ``eval`` subcommand per entry), :mod:`mimbench.steps` (:class:`~mimbench.steps.Evaluate`),
:mod:`mimbench.demo`, :mod:`mimbench.reproduce`, :mod:`mimbench.jobs`, :mod:`mimbench.bench` and
:func:`mimbench.evals.run_eval`. Adding a task is one :func:`register_task` call (or one entry below) plus its
module. Config paths are relative to ``eval_configs/`` (:func:`mimbench.paths.eval_config`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

from mimbench.errors import MimbenchError
from mimbench.schema import LAYERS_SYNTAX, POOLS, SELECTION_ON

#: Data variables of the full-scale job files (:mod:`mimbench.jobs`): shell variables set by the user.
IMAGENET, ADE20K = "$IMAGENET", "$ADE20K"
#: mmengine launchers of the segmentation runner (``auto``: read from the torchrun / Slurm environment).
LAUNCHERS = ("auto", "none", "pytorch", "slurm")
BUILTIN_DATA = "builtin:fashion-mnist"
BUILTIN_SEG_DATA = "builtin:fashion-mnist-seg"
#: `mimbench demo --quick` budget of the tasks that only read features: a part of each split.
QUICK_FEATURE_LIMITS = ("data.limit_train=2048", "data.limit_val=500")


@dataclass(frozen=True)
class Option:
    """An extra option of a task's ``mimbench eval`` subcommand, passed to its runner as keyword ``name``.

    ``annotation`` is the Python type Typer parses (``str``, ``Optional[bool]`` ...); ``choices``, when given,
    are the only values accepted (the CLI lists them on a wrong value).
    """

    name: str
    flags: tuple[str, ...]
    default: Any
    help: str
    annotation: Any = str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    """One evaluation task; see the module docstring for who reads which field."""

    name: str
    runner: str                   # "module:function", called with the keyword arguments of run_eval
    kind: str                     # schema kind of its configs (mimbench.schema.KINDS)
    demo_config: str              # under eval_configs/: the CLI default, the demo, the bench default
    protocol_config: str          # under eval_configs/: the published protocol, named in --help
    summary: str                  # first line of `mimbench eval <name> --help`
    example: str                  # "Example: ..." line of the same help
    default_data: str = BUILTIN_DATA
    data_help: str = "builtin:fashion-mnist or an ImageNet-style folder"
    options: tuple[Option, ...] = ()
    # As a pipeline step (demo, reproduce): extra runner keywords, and whether the console goes to console.log.
    step_options: Mapping[str, Any] = field(default_factory=dict)
    console_log: bool = False
    feature_cache: bool = False   # shares one feature cache per encoder with the other tasks that set it
    # Demo budgets: --set overrides per demo scale ("full", "quick"), and the default data built once per
    # pipeline by `demo_data` ("module:function(root, **kwargs) -> root") with `demo_data_kwargs[scale]`.
    demo_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    demo_data: str | None = None
    demo_data_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    in_grid_demo: bool = False    # evaluated at every point of a demo-scale reproduce grid (cheap tasks only)
    in_demo: bool = True          # evaluated on every encoder of `mimbench demo`
    # Tasks whose output on the same encoder this one reads (e.g. the fine-tuned model): a pipeline runs them first.
    after: tuple[str, ...] = ()
    # The optional extra the task needs and the modules it provides: without them `mimbench demo` leaves the task
    # out and says which extra adds it (`mimbench eval <task>` refuses with the same fix).
    extra: str | None = None
    requires: tuple[str, ...] = ()
    full_data: str | None = None  # data variable of the full-scale job files; None: not in the job grid
    full_options: tuple[str, ...] = ()  # extra `mimbench eval` words of a full-scale job
    bench_mode: str | None = None  # `mimbench bench <mode>`; None: not benchmarked
    bench_step: str | None = None  # "module:function" building the timed step (mimbench.bench.StepBuilder)
    bench_batch: str | None = None  # dotted config key of the bench's default batch size
    # How `mimbench eval <name>` prints the scalar metrics: "pairs" (``top1=71.5, top5=90.1``) or "dict"
    # (the Python dict, ``{'aAcc': ..., 'mIoU': ...}``: segmentation's line, which scripts already parse).
    metrics_line: str = "pairs"


#: ``--pool`` of the tasks that read frozen features (knn, linear): one of :data:`mimbench.schema.POOLS`; unset,
#: the config's ``pool`` where the task has one (linear), else auto.
POOL_OPTION = Option("pool", ("--pool",), None, "Which tokens make the feature: auto (the encoder family's pooling: "
                     "the class token, or the mean of the patch tokens for encoders without one or whose metadata "
                     "says global_pool=avg), cls (class token), avg (mean of the patch tokens, registers excluded) "
                     "or cls+avg (both). Default: the config's pool where the task has one (unset: auto)",
                     choices=POOLS)


def resolve(ref: str, task: str) -> Callable:
    """The function named ``module:function`` (imported now); MimbenchError when the module is absent."""
    module_name, func_name = ref.split(":")
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise MimbenchError(f"The {task} evaluation is not available in this installation.",
                            "Use one of the available tasks.") from err
    return getattr(module, func_name)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the table (a name already there is refused); returns it."""
    if task.name in TASKS:
        raise MimbenchError(f"An evaluation task named {task.name!r} is already registered.",
                            "Give the new task another name.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The entry of task ``name``; MimbenchError listing the known tasks otherwise."""
    if name not in TASKS:
        raise MimbenchError(f"Unknown evaluation task {name!r}.", f"Use one of: {', '.join(TASKS)}.")
    return TASKS[name]


def all_tasks() -> tuple[Task, ...]:
    """Every task, in table order."""
    return tuple(TASKS.values())


register_task(Task(
    name="knn", runner="mimbench.evals.knn:run_knn", kind="knn",
    demo_config="demo/knn_fmnist.py", protocol_config="knn/dino_k20.py",
    summary="Weighted k-NN on frozen class-token features (DINO protocol).",
    example="mimbench eval knn --encoder enc.safetensors --data builtin:fashion-mnist --out runs/knn",
    feature_cache=True, demo_overrides={"quick": QUICK_FEATURE_LIMITS}, in_grid_demo=True, options=(POOL_OPTION,),
    bench_mode="features", bench_step="mimbench.bench:features_step", bench_batch="batch_size",
))
register_task(Task(
    name="linear", runner="mimbench.evals.linear:run_linear", kind="linear",
    demo_config="demo/linear_fmnist.py", protocol_config="linear/mae_vit-b_in1k.py",
    summary="Linear probe of the frozen encoder (MAE protocol).",
    example="mimbench eval linear --encoder enc.safetensors --config eval_configs/linear/mae_vit-b_in1k.py "
            "--data /data/imagenet --out runs/lin",
    feature_cache=True, demo_overrides={"quick": QUICK_FEATURE_LIMITS}, in_grid_demo=True, full_data=IMAGENET,
    options=(
        Option("layers", ("--layers",), None, f"Blocks the head reads: {LAYERS_SYNTAX}. Default: the config's "
               "layers ('last')", annotation=Optional[str]),
        POOL_OPTION,
        Option("select_on", ("--select-on",), None, "Where --layers all selects its best block: train-holdout (a "
               "held-out part of the training set, not trained on) or val (the validation split, as published "
               "selections do). Default: the config's selection.on (train-holdout)", annotation=Optional[str],
               choices=SELECTION_ON),
    ),
    bench_mode="linear", bench_step="mimbench.bench:linear_step", bench_batch="optim.batch_size",
))
register_task(Task(
    name="attentive", runner="mimbench.evals.attentive:run_attentive", kind="attentive",
    demo_config="demo/attentive_fmnist.py", protocol_config="attentive/ep_vit-b_in1k.py",
    summary="Attentive probe of the frozen encoder: a learned attention-pooling head on its tokens (CAE, EP or "
            "V-JEPA head preset).",
    example="mimbench eval attentive --encoder enc.safetensors --config eval_configs/attentive/ep_vit-b_in1k.py "
            "--data /data/imagenet --out runs/att",
    demo_overrides={"quick": (*QUICK_FEATURE_LIMITS, "schedule.epochs=2")},
    options=(Option("layers", ("--layers",), None, "The block whose tokens the head attends to: 'last' or a block "
                    "index (7; -2 counts from the end). Default: the config's layers ('last')",
                    annotation=Optional[str]),),
))
register_task(Task(
    name="finetune", runner="mimbench.evals.finetune:run_finetune", kind="finetune",
    demo_config="demo/finetune_fmnist.py", protocol_config="finetune/mae_vit-b_in1k.py",
    summary="End-to-end fine-tuning (MAE protocol).",
    example="mimbench eval finetune --encoder enc.safetensors --config eval_configs/finetune/mae_vit-b_in1k.py "
            "--data /data/imagenet --out runs/ft",
    demo_overrides={"quick": ("schedule.epochs=1", "schedule.warmup_epochs=0.2", "data.limit_train=1024",
                              "data.limit_val=500")},
    full_data=IMAGENET,
    bench_mode="finetune", bench_step="mimbench.bench:finetune_step", bench_batch="optim.batch_size",
))
register_task(Task(
    name="segment", runner="mimbench.evals.segment:run_segment", kind="segment",
    demo_config="segmentation/demo_fmnist_seg.py",
    protocol_config="segmentation/upernet_vit-b_ade20k_512x512_160k.py",
    summary="UperNet semantic segmentation through mmsegmentation. Trains, then tests single-scale (the "
            "config's test mode) and, by default, multi-scale + flip; the run record holds aAcc/mIoU/mAcc, "
            "their _ms counterparts and the per-class IoU.",
    example="mimbench eval segment --encoder enc.safetensors --config "
            "eval_configs/segmentation/upernet_vit-b_ade20k_512x512_160k.py --data /data/ADEChallengeData2016 "
            "--out runs/seg",
    default_data=BUILTIN_SEG_DATA, metrics_line="dict",
    data_help="builtin:fashion-mnist-seg or an ADE20K root (ADEChallengeData2016)",
    options=(
        Option("launcher", ("--launcher",), "auto", "mmengine launcher: auto (from the torchrun / Slurm "
               "environment), none (one process), pytorch (torchrun) or slurm (srun)", choices=LAUNCHERS),
        Option("aug_test", ("--aug-test/--no-aug-test",), None, "Also test multi-scale + flip (mIoU_ms ...). "
               "Default: when the config defines tta_model/tta_pipeline", annotation=Optional[bool]),
    ),
    # One process, single-scale test only (the multi-scale + flip test costs about 12x the single-scale one on
    # a CPU); mmsegmentation prints every parameter's layer id: the terminal stays readable, the log complete.
    step_options={"launcher": "none", "aug_test": False}, console_log=True,
    demo_overrides={"full": ("train_cfg.max_iters=150",), "quick": ("train_cfg.max_iters=10",)},
    demo_data="mimbench.data.seg:build_fashion_mnist_seg", demo_data_kwargs={"quick": {"n_train": 200, "n_val": 50}},
    full_data=ADE20K, full_options=("--launcher", "pytorch"),
    bench_mode="segment", bench_step="mimbench.bench:segment_step", bench_batch="train_dataloader.batch_size",
))
register_task(Task(
    name="lowshot", runner="mimbench.evals.lowshot:run_lowshot", kind="lowshot",
    demo_config="demo/lowshot_fmnist.py", protocol_config="lowshot/msn_logreg_in1k.py",
    summary="Low-shot classification: MSN's logistic regression (cyanure, the extra 'lowshot') on frozen class "
            "tokens of the images a split file lists, or of K images per class drawn with each of N seeds; the "
            "record holds the mean and std over the runs, and each run has its own record in OUT/runs.",
    example="mimbench eval lowshot --encoder enc.safetensors --config eval_configs/lowshot/msn_logreg_in1k.py "
            "--data /data/imagenet --split-file imagenet_subsets1/1imgs_class.txt --out runs/lowshot",
    options=(
        Option("split_file", ("--split-file",), None, "A split file (SimCLR / MSN format: one training image "
               "name per line, class = its folder; built-in data: image indices); repeat for several splits, one "
               "run each", annotation=Optional[List[Path]]),
        Option("shots", ("--shots",), None, "Images per class drawn for each seed (instead of a split file)",
               annotation=Optional[int]),
        Option("seeds", ("--seeds",), None, "Number of seeds with --shots (default: the config's, 3)",
               annotation=Optional[int]),
    ),
    # In the demo: the report's "10-shot top-1" column; the quick budget reads the same cached features as k-NN.
    feature_cache=True, demo_overrides={"quick": QUICK_FEATURE_LIMITS}, extra="lowshot", requires=("cyanure",),
))


def installed(task: Task) -> bool:
    """Whether the optional packages ``task.requires`` names can be imported here."""
    return all(importlib.util.find_spec(module) is not None for module in task.requires)


__all__ = ["ADE20K", "BUILTIN_DATA", "BUILTIN_SEG_DATA", "IMAGENET", "LAUNCHERS", "Option",
           "POOL_OPTION", "TASKS", "Task",
           "all_tasks", "get_task", "installed", "register_task", "resolve"]
