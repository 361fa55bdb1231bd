"""The ``mimbench`` command line (Typer).

Every command delegates to a library function; this module only parses arguments,
turns :class:`~mimbench.errors.MimbenchError` into a one-paragraph message with exit
status 2, and imports the torch-heavy modules (encoders, pre-training, bench) inside the commands that use
them, so that ``--help`` stays instant. The ``eval`` subcommands are generated from the task table
(:mod:`mimbench.evals.tasks`). ``pretrain`` and every ``eval`` subcommand call the Python API
(:func:`mimbench.api.pretrain`, :func:`mimbench.api.evaluate`) with their ``--set`` values as given, so a script
and the command line cannot drift apart.
"""
from __future__ import annotations

import functools
import inspect
import sys
from importlib import import_module
from pathlib import Path
from typing import Callable, List, Literal, Optional

import typer
from typer.models import CommandInfo

from mimbench import api  # the functions every pretrain/eval command calls; torch only when one runs
from mimbench.config import format_override
from mimbench.control import build_control
from mimbench.demo import run_demo
from mimbench.env import check_torch, env_report, format_env_report
from mimbench.errors import MimbenchError
from mimbench.evals.tasks import Task, all_tasks
from mimbench.paths import EVAL_CONFIGS, config_summary, resolve_config, shipped_configs
from mimbench.reproduce import PAPERS, SCALES, run_reproduce
from mimbench.results.html_site import write_site
from mimbench.results.leaderboard import TASK_METRIC, compare_runs, show_leaderboard
from mimbench.results.report import FORMATS, console_table, write_report
from mimbench.schema import AMP_CHOICES, TRACKERS, knows_key

app = typer.Typer(
    help="Pre-train masked-image-modelling ViT encoders and evaluate them under the published protocols.\n\n"
    "Example: mimbench demo",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

SET_HELP = ("Override a config value, e.g. --set optim.lr=1e-3 (repeatable). Values are Python literals, "
            "or true/false/null; anything else is a string.")

# Typed choices, built from the constants of the modules that implement them (a config value's: the schema's
# allowed values, mimbench.schema): Typer refuses any other value and lists these, and offers them to shell
# completion.
ReportFormat = Literal[FORMATS]
LeaderboardTask = Literal[tuple(TASK_METRIC)]
Paper = Literal[PAPERS]
Scale = Literal[SCALES]
Amp = Literal[AMP_CHOICES]
BenchAmp = Literal[(*AMP_CHOICES, "calibrate")]  # bench only: time each precision, change nothing
TRACKER_HELP = ("Also log to this tracker (repeatable; sets runtime.trackers): tensorboard, wandb (offline) or "
                "mlflow (file store), under OUT. Needs: pip install 'mimbench[trackers]'")


def _check_trackers(values: Optional[List[str]]) -> Optional[List[str]]:
    bad = [v for v in values or () if v not in TRACKERS]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(map(repr, TRACKERS))}.")
    return values


def _tracker_option() -> typer.models.OptionInfo:
    """``--tracker``, repeatable; a value outside TRACKERS is refused with the list (Typer takes no list of a
    Literal)."""
    return typer.Option(None, "--tracker", help=TRACKER_HELP, callback=_check_trackers,
                        autocompletion=lambda incomplete: [t for t in TRACKERS if t.startswith(incomplete)])


def _tracker_overrides(tracker) -> list[str]:
    """``--tracker`` as the ``--set`` override of ``runtime.trackers`` (none given: the config's)."""
    return [format_override("runtime.trackers", list(tracker))] if tracker else []


class LazyChoice:
    """The choices of an option that are the constant of a torch-heavy module (``module:name``; a callable is
    called): imported when the option is parsed or completed, not when the CLI is built, which happens on
    every invocation, ``mimbench --help`` included. A value outside them is refused with the list."""

    def __init__(self, ref: str):
        self.ref = ref

    @property
    def values(self) -> tuple[str, ...]:
        module, name = self.ref.split(":")
        value = getattr(import_module(module), name)
        return tuple(value() if callable(value) else value)

    def check(self, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in self.values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, self.values))}.")
        return value

    def complete(self, incomplete: str) -> list[str]:
        return [v for v in self.values if v.startswith(incomplete)]


LAYOUTS = LazyChoice("mimbench.encoders.convert:LAYOUTS")
BENCH_MODES = LazyChoice("mimbench.bench:modes")
EXPORT_TARGETS = LazyChoice("mimbench.export:TARGETS")
ENCODER_HELP = ("Encoder file (.safetensors), a checkpoint in a supported layout (.pth/.pt/.bin/.safetensors) or a "
                "Hugging Face model folder")
FROM_HELP = "Checkpoint layout of --encoder (auto: detected from the keys; docs/checkpoints.md)"


def _from_option(*flags: str) -> typer.models.OptionInfo:
    return typer.Option("auto", *(flags or ("--from",)), help=FROM_HELP, callback=LAYOUTS.check,
                        autocompletion=LAYOUTS.complete)


def _user_errors(fn):
    """Print MimbenchError as a clean paragraph and exit 2; everything else is a real bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MimbenchError as exc:
            typer.secho(f"error: {exc.problem}", fg=typer.colors.RED, err=True)
            if exc.fix:
                typer.echo(exc.fix, err=True)
            raise typer.Exit(2)

    return wrapper


@app.callback()
@_user_errors
def _start() -> None:
    """Runs before every command (not for --help): an installed torch below the lowest supported is refused."""
    check_torch()


@app.command()
@_user_errors
def info(path: Path = typer.Argument(..., help="Encoder file (.safetensors) or checkpoint to describe."),
         from_: str = _from_option()):
    """Print an encoder's metadata and parameter count (for a checkpoint: as it will be read).

    Example: mimbench info runs/demo/mae/encoder.safetensors
    """
    from mimbench.encoders import describe_encoder  # torch and safetensors

    typer.echo(describe_encoder(path, layout=from_))


@app.command()
@_user_errors
def pretrain(
    config: Path = typer.Option(..., help="Pre-training config: a file, or a shipped config's name, e.g. "
                                "pretrain/mae_tiny_fmnist (mimbench configs pretrain lists them)"),
    data: str = typer.Option("builtin:fashion-mnist", help="builtin:fashion-mnist or an ImageNet-style folder"),
    out: Path = typer.Option(..., help="Output directory (checkpoints, log, exported encoder)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint-latest.pt"),
    tracker: Optional[List[str]] = _tracker_option(),
):
    """Pre-train an encoder (MAE, robust-MAE recipe, DDAE, MAE+DDS, BEiT v2, BEiT v2+DDS) and export it as an
    encoder file, or a BEiT v2 tokenizer (VQ-KD config) as a tokenizer file.

    Example: mimbench pretrain --config pretrain/configs/mae_tiny_fmnist.py --out runs/mae
    """
    overrides = list(set_ or []) + _tracker_overrides(tracker)
    path = api.pretrain(config, out, overrides=overrides, data=data, resume=resume)
    typer.echo(f"{'tokenizer' if path.name.startswith('tokenizer') else 'encoder'} written to {path}")


# Every `eval` subcommand defaults to the demo config of its task on the built-in data (the default --data):
# a published protocol on the 12,000-image subset would be meaningless (LARS at batch 16,384, 100 epochs), and a
# demo config on ImageNet would be mislabelled. The protocols are one --config away, named in each --help.
CONFIG_HELP = ("Evaluation config. Default: the demo config for the built-in data (its departures from the "
               "published protocol are recorded); the published protocol: {protocol}. A file, or the name of a shipped "
               "config (mimbench configs lists them)")


def _option(name: str, annotation, info) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _eval_parameters(task: Task) -> list[inspect.Parameter]:
    """The options of ``mimbench eval <task>``: the common ones, then the entry's own (``task.options``)."""
    params = [
        _option("encoder", Path, typer.Option(..., *task.encoder_option[:1], help=task.encoder_option[1])
                if task.encoder_option else typer.Option(..., help=ENCODER_HELP)),
        _option("from_", str, _from_option()),
        _option("config", Path, typer.Option(EVAL_CONFIGS / task.demo_config, help=CONFIG_HELP.format(
            protocol=EVAL_CONFIGS / task.protocol_config))),
        _option("data", str, typer.Option(task.default_data, help=task.data_help)),
        _option("out", Path, typer.Option(..., help="Output directory (checkpoint, run record)")),
        _option("set_", Optional[List[str]], typer.Option(None, "--set", help=SET_HELP)),
        _option("resume", bool, typer.Option(False, help="Continue from OUT's last checkpoint")),
    ]
    if knows_key(task.kind, "runtime.trackers"):
        params.append(_option("tracker", Optional[List[str]], _tracker_option()))
    for opt in task.options:
        annotation = Literal[opt.choices] if opt.choices else opt.annotation
        params.append(_option(opt.name, annotation, typer.Option(opt.default, *opt.flags, help=opt.help)))
    return params


def _metrics_line(task: Task, metrics: dict) -> str:
    """The scalar metrics (per-class tables are in the record) as the task's entry says: ``key=value, ...``
    or the dict."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    if task.metrics_line == "dict":
        return str(scalars)
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars.items())


def _eval_command(task: Task) -> Callable:
    """The ``mimbench eval <task>`` command of a table entry: its options are :func:`_eval_parameters`."""

    def command(*, encoder: Path, from_: str, config: Path, data: str, out: Path, set_, resume: bool, tracker=None,
                **options):
        record = api.evaluate(task.name, encoder, data=data, config=config, out=out,
                              overrides=list(set_ or []) + _tracker_overrides(tracker), layout=from_, resume=resume,
                              **options)
        typer.echo(f"{task.name}: {_metrics_line(task, record['metrics'])}")

    params = _eval_parameters(task)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = (f"{task.summary} Default: the demo config on the built-in data.\n\n"
                       f"Example: {task.example}")
    command.__name__ = task.name
    return _user_errors(command)


class _TaskCommands(typer.Typer):
    """The ``eval`` group: one subcommand per entry of :data:`mimbench.evals.tasks.TASKS`, read each time the
    CLI is built (on every invocation), so that a task registered later has its subcommand too."""

    @property
    def registered_commands(self) -> list[CommandInfo]:
        return [CommandInfo(name=task.name, callback=_eval_command(task)) for task in all_tasks()]

    @registered_commands.setter
    def registered_commands(self, value) -> None:  # typer.Typer.__init__ starts it empty; it is derived here
        pass


eval_app = _TaskCommands(help="Evaluate an encoder on one task (linear probe, fine-tune, k-NN, ADE20K "
                         "segmentation, ...): one subcommand per task.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@app.command()
@_user_errors
def control(
    out: Path = typer.Option(..., help="Encoder file to write (.safetensors)"),
    like: Optional[Path] = typer.Option(None, help="Encoder file (ViT) whose architecture to copy"),
    config: Optional[Path] = typer.Option(None, help="Pre-training config whose model to build at initialisation"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP + " Only with --config."),
    seed: int = typer.Option(0, help="Seed of the initialisation (0: the pre-training configs' seed)"),
):
    """Write the random-initialisation control: an encoder of the same architecture, never trained.

    With --config it is the encoder that pre-training starts from; evaluate it beside the pre-trained one
    with the same configs to see what pre-training added.

    Example: mimbench control --config pretrain/configs/mae_tiny_fmnist.py --out runs/control/encoder.safetensors
    """
    if set_ and config is None:
        raise MimbenchError("--set changes a pre-training config, and none was given.",
                            "Use --set together with --config.")
    path = build_control(out, like=like, config=resolve_config(config) if config is not None else None,
                         overrides=list(set_ or []), seed=seed)
    typer.echo(f"random-initialisation control written to {path}")


JOBS_HELP = ("Steps run side by side, each in its own process, a step starting once the steps it needs are done; "
             "each step's output goes to its console.log. Every step has 1 torch thread whatever JOBS, so the "
             "table does not depend on it. Default: one step per core; 1: one after another in this process")


@app.command()
@_user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes encoders, records and the report"),
    quick: bool = typer.Option(False, help="Toy size, under 3 minutes"),
    jobs: Optional[int] = typer.Option(None, min=1, help=JOBS_HELP),
):
    """Run the whole pipeline on the embedded Fashion-MNIST data: pre-train, evaluate, report.

    Example: mimbench demo --quick
    """
    run_demo(out=out, quick=quick, jobs=jobs)


@app.command()
@_user_errors
def analyze(
    encoder: Path = typer.Argument(..., help="Encoder file (.safetensors) or checkpoint to analyse"),
    data: str = typer.Option("builtin:fashion-mnist", help="builtin:fashion-mnist or an ImageNet-style folder"),
    out: Path = typer.Option(..., help="Output directory (the analyze record and its figures)"),
    compare: Optional[Path] = typer.Option(None, help="A second encoder: linear CKA between every pair of their "
                                           "blocks (any depths)"),
    pretrain_run: Optional[Path] = typer.Option(None, help="The encoder's MAE-family pre-training folder: loss by "
                                                "distance to the nearest visible patch, target-normalisation "
                                                "statistics"),
    samples: int = typer.Option(1000, help="Size of the seeded subset of val images"),
    seed: int = typer.Option(0, help="Seed of the subset (and of the masks and probe heads)"),
    limit_train: Optional[int] = typer.Option(None, help="First N training images for the per-layer probes"),
    limit_val: Optional[int] = typer.Option(None, help="First N val images for the per-layer probes"),
    layout: str = _from_option(),
):
    """Attention distance and entropy, per-layer k-NN / linear accuracy, CKA and RankMe of an encoder.

    See docs/analysis.md for each measure and how to read its figure.

    Example: mimbench analyze runs/demo/encoders/ddae/encoder.safetensors --data builtin:fashion-mnist
    --compare runs/demo/encoders/mae/encoder.safetensors --out runs/analyze/ddae
    """
    from mimbench.analysis import run_analyze  # torch and the encoders: only when an analysis runs

    record = run_analyze(encoder, data=data, out=out, compare=compare, pretrain_run=pretrain_run, samples=samples,
                         seed=seed, limit_train=limit_train, limit_val=limit_val, layout=layout)
    skipped = record["protocol"]["skipped"]
    typer.echo(f"analysis of {encoder} written to {out}" + "".join(f"\nskipped {k}: {v}" for k, v in skipped.items()))


@app.command()
@_user_errors
def report(
    dirs: List[Path] = typer.Argument(..., help="Directories holding run records"),
    format: ReportFormat = typer.Option("md", help="Table format"),
    out: Optional[Path] = typer.Option(None, help="Output file (default: print)"),
):
    """Aggregate run records into a table (mean ± std over seeds), with the figures when --out is given.

    Printed to a terminal, the Markdown table is drawn to fit its width; piped, it is plain Markdown.

    Example: mimbench report runs/demo --format md
    """
    if out is None and format == "md":
        console_table(dirs)
    elif out is not None and format == "html":  # a self-contained page with its figures inlined: not for a terminal
        write_report(dirs, fmt=format, out=out)
        typer.echo(f"report written to {out}")
    else:
        typer.echo(write_report(dirs, fmt=format, out=out))


@app.command()
@_user_errors
def leaderboard(
    task: Optional[LeaderboardTask] = typer.Option(None, help="Only this task"),
    arch: Optional[str] = typer.Option(None, help="e.g. vit-b/16"),
    include_runs: Optional[List[Path]] = typer.Option(None, help="Directory of your own run records to rank "
                                                      "alongside (repeatable)"),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a static site to this folder: one page per "
                                        "task, every architecture (filters on the pages)"),
):
    """Published results (with sources), optionally with your own runs ranked among them.

    Example: mimbench leaderboard --task finetune --arch vit-b/16
    Example: mimbench leaderboard --html site --include-runs runs/demo/evals
    """
    if html is not None:
        pages = write_site(html, include_runs=include_runs or None)
        typer.echo(f"leaderboard site written to {pages[0]} ({len(pages) - 1} task pages)")
        return
    show_leaderboard(task=task, arch=arch, include_runs=include_runs or None)


@app.command()
@_user_errors
def compare(runs: List[Path] = typer.Argument(..., help="Run records or directories")):
    """Place your runs among published results of the same architecture and protocol.

    Example: mimbench compare runs/lin/record.json
    """
    compare_runs(runs)


@app.command()
@_user_errors
def convert(
    src: Path = typer.Argument(..., help="Checkpoint in a supported layout (official MAE, BEiT, DINO ... .pth)"),
    dst: Path = typer.Argument(..., help="Encoder file to write (.safetensors)"),
    layout: str = _from_option("--from", "--layout"),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, only for non-standard widths"),
    technique: Optional[str] = typer.Option(None, help="Provenance: pre-training technique (default from the layout)"),
    epochs: Optional[float] = typer.Option(None, help="Provenance: pre-training epochs (default from the checkpoint)"),
    data: str = typer.Option("", help="Provenance: pre-training data, e.g. in1k"),
):
    """Convert a foreign checkpoint into a mimbench encoder file (weights-only loading, never unpickles code).

    Example: mimbench convert mae_pretrain_vit_base.pth mae_b.safetensors --epochs 1600 --data in1k
    """
    from mimbench.encoders import convert_checkpoint  # torch

    path = convert_checkpoint(src, dst, layout=layout, num_heads=num_heads, technique=technique, epochs=epochs, data=data)
    typer.echo(f"wrote {path}")


@app.command()
@_user_errors
def export(
    encoder: Path = typer.Argument(..., help="Encoder file, checkpoint or Hugging Face folder to export"),
    to: str = typer.Option(..., "--to", help="hf: a transformers folder (ViTModel / BeitModel); mae: MAE's "
                           "{'model': sd}; timm: an encoder file", callback=EXPORT_TARGETS.check,
                           autocompletion=EXPORT_TARGETS.complete),
    out: Path = typer.Option(..., help="Folder (--to hf) or file (--to mae/timm) to write"),
    from_: str = _from_option(),
    results: Optional[List[Path]] = typer.Option(None, help="Where to look for run records of this encoder for the "
                                                 "model card (repeatable; default: the encoder's folder)"),
):
    """Export an encoder for Hugging Face transformers, the official MAE fine-tuning code, or timm.

    Example: mimbench export runs/demo/mae/encoder.safetensors --to hf --out mae_hf
    """
    from mimbench.export import export as export_encoder  # torch

    typer.echo(f"wrote {export_encoder(encoder, to, out, layout=from_, results_dirs=results or ())}")


@app.command()
@_user_errors
def reproduce(paper: Paper = typer.Argument(..., help="The paper whose ablation grid to run"),
              scale: Scale = typer.Option("demo", help="demo (run on the embedded data) | full (write ImageNet commands)"),
              out: Path = typer.Option(Path("runs/reproduce"), help="Output directory"),
              quick: bool = typer.Option(False, help="Smallest demo configs (smoke run)"),
              jobs: Optional[int] = typer.Option(None, min=1, help=JOBS_HELP)):
    """Run (demo) or emit (full) the ablation grid of a seed paper.

    Example: mimbench reproduce ddae --scale full --out runs/ddae-grid
    """
    typer.echo(f"written to {run_reproduce(paper, scale=scale, out=out, quick=quick, jobs=jobs)}")


def _replaced_preset(value: Optional[str]) -> Optional[str]:
    """``bench --preset`` (the old ``bench train|forward --preset NAME``) is refused before the mode is
    parsed, so the message names the replacement rather than only listing the new modes."""
    if value is not None:
        typer.secho("error: --preset was replaced by the model name of a pre-training config.", fg=typer.colors.RED,
                    err=True)
        typer.echo(f"Use: mimbench bench pretrain --set model.name={value}", err=True)
        raise typer.Exit(2)
    return value


@app.command()
@_user_errors
def bench(
    what: Optional[str] = typer.Argument(None, help="pretrain | features | data, or a task's bench mode (linear, "
                                         "finetune, segment ...); leave out with --suite", callback=BENCH_MODES.check,
                                         autocompletion=BENCH_MODES.complete),
    config: Optional[Path] = typer.Option(None, help="Config of the loop to time (default: the demo/protocol config of WHAT)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)"),
    steps: int = typer.Option(10, help="Timed steps (after the warm-up)"),
    batch: Optional[int] = typer.Option(None, help="Batch size (default: the config's)"),
    warmup: int = typer.Option(3, help="Untimed warm-up steps"),
    compare: bool = typer.Option(False, help="Also time the plain eager fp32 path, interleaved, and print the ratio"),
    peak_tflops: Optional[float] = typer.Option(None, help="Peak TFLOP/s for MFU (default: known GPUs' bf16 peak)"),
    encoder: Optional[Path] = typer.Option(None, help="features/linear/finetune/segment: encoder file"),
    arch: Optional[str] = typer.Option(None, help="features/linear/finetune: random-init timm ViT (default vit_base_patch16_224)"),
    data: Optional[str] = typer.Option(None, help="data: ImageFolder root"),
    workers: Optional[int] = typer.Option(None, help="data: loader workers (default: this machine's CPUs)"),
    amp: Optional[BenchAmp] = typer.Option(None, help=f"{' | '.join(AMP_CHOICES)} (default: the config's runtime.amp), "
                                           "or calibrate: time each precision for this workload and record it"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: runtime.compile)"),
    out: Path = typer.Option(Path("runs/bench"), help="Directory for the bench record"),
    step_img_per_s: Optional[float] = typer.Option(None, help="data: a model step's img/s (from bench pretrain/"
                                                   "finetune/...): prints the loader workers it needs"),
    suite: Optional[str] = typer.Option(None, help="gpu: the ViT-B/L MAE pre-training (with and without compile), "
                                        "features, fine-tune and UperNet steps in bf16, rows appended to --append"),
    toy: bool = typer.Option(False, help="--suite at toy sizes (a check of the suite, e.g. with --device cpu)"),
    append: Optional[Path] = typer.Option(None, help="--suite: Markdown file to append the rows to (e.g. BENCHMARKS.md)"),
    preset: Optional[str] = typer.Option(None, hidden=True, is_eager=True, callback=_replaced_preset),
):
    """Time a hot loop on this machine: img/s, step time, FLOPs/img, MFU, memory; --compare against the plain path.

    Example: mimbench bench pretrain --config pretrain/configs/mae_tiny_fmnist.py --compare
    Example: mimbench bench --suite gpu --append BENCHMARKS.md
    """
    from mimbench.bench import format_bench, run_bench, run_suite  # torch, timm and the pre-training models

    if suite is not None or what is None:
        if suite is None or what is not None:
            raise MimbenchError("Give a bench mode (e.g. `mimbench bench pretrain`) or --suite gpu, not both or neither.",
                                "Run `mimbench bench --help` for the modes.")
        run_suite(suite, device=device, steps=steps, warmup=warmup, toy=toy, out=out, append=append)
        return

    record = run_bench(what, config=config, overrides=list(set_ or []), device=device, steps=steps, batch=batch,
                       warmup=warmup, compare=compare, peak_tflops=peak_tflops, encoder=encoder, arch=arch,
                       data=data, workers=workers, amp=amp, compile=compile, out=out, step_img_per_s=step_img_per_s)
    typer.echo(format_bench(record))


@app.command("env")
@_user_errors
def env_command():
    """Print what results here would be produced with: library versions (torch, CUDA, timm, mmengine, mmseg,
    mmcv and whether its compiled ops are present), devices, bf16/AMX/TF32 support and the precision amp=auto
    picks. Every run record carries the same versions and hardware fields.

    Example: mimbench env
    """
    typer.echo(format_env_report(env_report()))


data_app = typer.Typer(no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.callback()
def data():
    """Prepare datasets as the evaluations read them (ImageNet from its official archives).

    Example: mimbench data imagenet --archives ~/Downloads/imagenet --out data/imagenet
    """


@data_app.command("imagenet")
@_user_errors
def data_imagenet(
    archives: Path = typer.Option(..., help="Folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                                  "ILSVRC2012_devkit_t12.tar.gz"),
    out: Path = typer.Option(..., help="The tree to write: OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG"),
    custom_archives: bool = typer.Option(False, "--custom-archives", help="Archives of the official structure that "
                                         "are not the official files (a subset): sizes and MD5 sums not checked"),
    md5: bool = typer.Option(True, "--md5/--no-md5", help="Check the official archives' MD5 sums (minutes for the "
                             "138 GB train archive; remembered when the command is run again)"),
):
    """Build the ImageNet-1k folder tree every evaluation reads from the official archives, with torchvision's
    parsing; resumable (run it again after an interruption), counts checked at the end.

    Example: mimbench data imagenet --archives ~/Downloads/imagenet --out data/imagenet
    """
    from mimbench.data.imagenet import build_imagenet_tree, format_summary  # torchvision

    typer.echo(format_summary(build_imagenet_tree(archives, out, custom=custom_archives, md5=md5)))


def _config_groups() -> dict[str, str]:
    """``mimbench configs TASK``: a config folder (``linear``, ``demo``, ``pretrain``, ...), or a task of the task
    table, which stands for the folder of its protocol config (``segment`` -> ``segmentation``)."""
    groups = {name.split("/")[0]: name.split("/")[0] for name in shipped_configs()}
    groups.update({t.name: Path(t.protocol_config).parts[0] for t in all_tasks()})
    return groups


@app.command("configs")
@_user_errors
def configs_command(task: Optional[str] = typer.Argument(None, help="Only this task's configs (linear, finetune, "
                                                         "knn, segment, demo, reproduce, pretrain)")):
    """List the configs shipped with mimbench, by the name --config takes, each with what it reproduces.

    Example: mimbench configs linear
    """
    groups = _config_groups()
    if task is not None and task not in groups:
        raise MimbenchError(f"No shipped configs for {task!r}.", f"Pass one of {', '.join(sorted(groups))}, or "
                            "nothing to list every config.")
    rows = [(name, config_summary(path)) for name, path in shipped_configs().items()
            if task is None or name.split("/")[0] == groups[task]]
    width = max(len(name) for name, _ in rows)
    typer.echo("\n".join(f"{name.ljust(width)}  {summary}".rstrip() for name, summary in rows))


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
