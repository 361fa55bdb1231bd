"""``mimbench demo``: the whole pipeline on the embedded Fashion-MNIST data, on a CPU, in minutes.

Pre-trains small encoders under MAE, the robust-MAE recipe and DDAE, adds the random-initialisation
control (the MAE config's model at its initialisation: what pre-training starts from), evaluates every
encoder on every task of :data:`mimbench.evals.tasks.TASKS` (k-NN, the linear and attentive probes, 10-shot
logistic regression over 3 seeds, fine-tuning and FashionMNIST-Seg segmentation), and ends with the report
table, its figures and the time taken.

The demo is a list of steps (:func:`demo_steps`) run by :class:`mimbench.steps.StepRunner`: a step whose
result is already in ``out``, made from the same config, overrides and encoder, is reused, so a second
run (or a run after an interruption) only does what is missing; a step left there by other settings
(``--quick`` into the same folder, an older config, a re-trained encoder) is removed and redone. Steps run side by
side, one per core by default (``--jobs``; each step's output in its folder's console.log), and the demo ends with
each step's time (also in ``steps.csv`` beside the report).

Every encoder, the control included, is evaluated with the same config per task (its entry's demo config,
eval_configs/demo/ and eval_configs/segmentation/demo_fmnist_seg.py): nothing is tuned per technique.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from mimbench.atomic import atomic_write
from mimbench.evals.tasks import all_tasks, installed
from mimbench.paths import eval_config, pretrain_config
from mimbench.results.report import console_table, write_report
from mimbench.steps import (Analyze, Build, Control, Evaluate, Outcome, Pretrain, Step, StepRunner, default_jobs,
                            reuse_note, timing_rows, write_timings)

CONTROL = "random-init"


@dataclass(frozen=True)
class DemoScale:
    """Budgets of one demo size; everything else comes from the configs themselves.

    ``name`` picks each task's own budget for this size (the ``demo_overrides`` and ``demo_data_kwargs`` of
    its entry in :data:`mimbench.evals.tasks.TASKS`).
    """

    name: str                                  # "full" or "quick"
    techniques: tuple[tuple[str, str], ...]    # (row name, pre-training config under pretrain/configs/)
    pretrain: tuple[str, ...]                  # --set overrides of every pre-training (and of the control)
    analysis: tuple[tuple[str, object], ...]   # `mimbench analyze` keywords of every encoder's analysis step


# Full demo: the three techniques' ViT-micro/4 configs on all 12,000 images for 3 epochs at blr 4e-3 (the README says
# why this size and budget); the tasks' demo configs with their full-demo budgets (segmentation: 150 iterations).
FULL = DemoScale(
    name="full",
    techniques=(("mae", "mae_micro_fmnist.py"), ("robust-mae", "robust-mae_micro_fmnist.py"),
                ("ddae", "ddae_micro_fmnist.py")),
    pretrain=("data.limit=None", "optim.batch_size=64", "optim.blr=4e-3", "schedule.epochs=3",
              "schedule.warmup_epochs=0.5", "runtime.ckpt_every=1", "runtime.log_every=20"),
    analysis=(("samples", 1000), ("limit_train", None), ("limit_val", None)),
)
# Quick: toy sizes (ViT-micro, 1 epoch on 1,024 images, two techniques; the tasks' quick budgets), used by the tests.
QUICK = DemoScale(
    name="quick",
    techniques=(("mae", "mae_micro_fmnist.py"), ("ddae", "ddae_micro_fmnist.py")),
    pretrain=("schedule.epochs=1", "schedule.warmup_epochs=0.2", "data.limit=1024"),
    analysis=(("samples", 200), ("limit_train", 2048), ("limit_val", 500)),  # the feature tasks' quick limits
)


def demo_data(out: Path, scale: DemoScale) -> tuple[dict[str, str], list[Build]]:
    """Task name -> its data: the default data, or for a task whose entry builds it (``demo_data``), the folder
    under ``out/data/`` at this scale's size, shared by every encoder; and the steps that build those folders
    (side by side with the pre-training; an evaluation waits for its data's)."""
    data, builds = {}, []
    for task in all_tasks():
        if task.demo_data is None or not installed(task):
            data[task.name] = task.default_data
            continue
        root = Path(out) / "data" / task.default_data.split(":", 1)[-1]
        builds.append(Build(task.name, task.demo_data, root, tuple(task.demo_data_kwargs.get(scale.name, {}).items())))
        data[task.name] = str(root)
    return data, builds


def _evaluations(out: Path, scale: DemoScale, name: str, data: dict[str, str], reading: bool = False) -> list[Step]:
    """Every task of the table on encoder ``name``, with its demo config and this scale's budget; ``reading``: only
    the tasks that read another evaluation's output (their entry's ``after``, with the control as reference), else
    only the others."""
    # The tasks that read features (k-NN, the cached linear probe) share one cache per encoder: extracted once.
    cache = f"cache_dir={str(Path(out) / 'features' / name)!r}"
    return [Evaluate(name, task.name, eval_config(task.demo_config),
                     (*task.demo_overrides.get(scale.name, ()), *((cache,) if task.feature_cache else ())),
                     data=data[task.name], reference=CONTROL if task.after else None)
            for task in all_tasks() if task.in_demo and installed(task) and bool(task.after) == reading]


def demo_steps(out: Path, scale: DemoScale, data: dict[str, str], builds: Sequence[Build] = ()) -> list[Step]:
    """The demo as steps: pre-train each technique, build the control and the tasks' data (``builds``), evaluate
    every encoder on every task, analyse every encoder.

    ``data``: task name -> data, ``builds``: the steps that make it (:func:`demo_data`). Side by side, a step
    starts once those it needs are done, the ready ones in this order: the pre-trainings first (the longest chain
    is pre-training, fine-tune, robustness), the analyses last (they fill the cores while the last evaluations
    run)."""
    names = [n for n, _ in scale.techniques] + [CONTROL]
    steps: list[Step] = [Pretrain(name, pretrain_config(cfg), scale.pretrain) for name, cfg in scale.techniques]
    # The control is the first technique's (MAE's) model at its initialisation, with the same overrides.
    steps.append(Control(CONTROL, config=pretrain_config(scale.techniques[0][1]), overrides=scale.pretrain))
    steps += builds
    for name in names:
        steps += _evaluations(out, scale, name, data)
    # then the tasks reading those evaluations (robustness: each fine-tune's model, the control's as normaliser)
    for name in names:
        steps += _evaluations(out, scale, name, data, reading=True)
    return steps + [Analyze(name, scale.analysis) for name in names]  # `mimbench analyze` of each encoder


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, jobs: int | None = None) -> Path:
    """Pre-train → control → evaluate (k-NN, linear probe, fine-tune, segmentation) → report; returns its path.

    ``jobs``: steps side by side (:meth:`mimbench.steps.StepRunner.run`; default
    :func:`mimbench.steps.default_jobs`, 1: one after another in this process)."""
    console = Console()
    out = Path(out)
    scale = QUICK if quick else FULL
    jobs = default_jobs() if jobs is None else jobs
    t0 = time.time()
    data, builds = demo_data(out, scale)
    runner = StepRunner(out, log=lambda text: console.print(text, markup=False, highlight=False),
                        header=lambda text: console.rule(f"[bold]{text}[/]", characters="─"))
    for task in all_tasks():
        if task.in_demo and not installed(task):
            console.print(f"{task.name}: left out ({', '.join(task.requires)} not installed; "
                          f"pip install 'mimbench[{task.extra}]' adds it)", markup=False, highlight=False)
    outcomes = runner.run(demo_steps(out, scale, data, builds), jobs=jobs)
    from mimbench.analysis.demo import locality_note  # torch and timm: only when the demo runs

    analyses = {o.step.encoder: o.record for o in outcomes if isinstance(o.step, Analyze)}
    elapsed = time.time() - t0
    write_timings(outcomes, out / "steps.csv")

    report = out / "report.md"
    note = reuse_note(outcomes)
    text = write_report([runner.evals_root, out / "analysis"], fmt="md", out=report)
    closing = (f"This run of the demo took {elapsed / 60:.1f} min ({elapsed:.0f} s) on this machine, "
               + (f"{jobs} steps side by side" if jobs > 1 else "one step at a time")
               + " (each step's time: steps.csv).")
    closing = "\n\n".join(filter(None, [locality_note(analyses), closing]))  # DDAE vs MAE attention distance
    body = text + "\n\n" + closing + ("\n\n" + note if note else "") + "\n"
    atomic_write(report, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"), what="the demo report",
                 fix="Choose an --out folder you can write to.")
    page = out / "report.html"  # the same report as one self-contained page to open in a browser or publish
    write_report([runner.evals_root, out / "analysis"], fmt="html", out=page)
    console.rule(f"[bold]report[/]  [dim]({elapsed:.0f} s in all)[/]")
    console_table([runner.evals_root], console)
    console.print()
    console.print(_timing_table(outcomes))
    console.print(closing + (" " + note if note else ""), markup=False, highlight=False)
    figures = sorted(p.name for p in report.parent.glob(f"{report.stem}_*.png"))
    console.print(f"encoders: {out / 'encoders'}\nrun records: {runner.evals_root}\nreport: {report}\n"
                  f"report page (self-contained HTML, figures inlined): {page}\n"
                  f"figures (next to the report): {', '.join(figures)}", markup=False, highlight=False)
    return report


def _timing_table(outcomes: list[Outcome]) -> Table:
    """How long each step took (ran, or reused from an earlier run)."""
    table = Table(title="time per step", title_justify="left")
    for column in ("step", "seconds", ""):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for row in timing_rows(outcomes):
        table.add_row(row["step"], f"{row['seconds']:.0f}", "reused" if row["status"] == "reused" else "")
    return table
