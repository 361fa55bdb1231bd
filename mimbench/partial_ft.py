"""``mimbench reproduce mae-fig9``: MAE's partial fine-tuning curve (He et al. CVPR 2022, section 4.3, Figure 9).

The figure: ImageNet-1k top-1 of an MAE ViT-L (24 blocks) when only its last K blocks are fine-tuned
(``finetune.trainable_blocks`` of :mod:`mimbench.evals.finetune`), K in 0, 1, 2, 4, 6, 12, 18, 24, and the last
block's MLP half between 0 and 1; each point fine-tuned with the Table 9 recipe for 50, 100 and 200 epochs and the
best of the three reported (appendix A.1). The text states 0 blocks 73.5 (the linear probe of the ablations' ViT-L,
Table 1: 800 pre-training epochs), the last MLP 79.1, one block 81.0, and MoCo v3's ViT-L linear probe 77.6: the
leaderboard's rows (:func:`paper_points`), drawn on the full-scale figure.

The sweep (:func:`sweep_points`): :data:`BLOCKS` cut to the encoder's depth D, every point at each fine-tuning length
of the scale; the point D is full fine-tuning (``trainable_blocks="all"``: the embeddings train too, the figure's
right end). Per point the best top-1 on val (as the paper selects) is kept and the other lengths are recorded
beside it (``table.md``, ``results.json``, ``fig9.png``: :func:`write_results`).

Scales (:data:`SWEEP_SCALES`):

``demo``
    The demo's encoder and budget: MAE ViT-micro/4 (depth 4: points 0, MLP, 1, 2, 4 = all) pre-trained as
    ``mimbench demo`` does (:data:`mimbench.demo.FULL`), then the demo fine-tune config
    (``eval_configs/demo/finetune_fmnist.py``, whose 2 epochs stand for Table 9's 50) at 1, 2 and 4 epochs -- the
    paper's 1 : 2 : 4 ratio at half the demo's length: the pre-training and the 15 fine-tunes (35 epochs) took 277 s
    with two side by side on a 2-core AMD EPYC -- with a warm-up of 0.5 epoch throughout (the config's 1 epoch would
    not fit under 1).
``quick``
    The same at the quick demo's pre-training budget, fine-tuned at 1 and 2 epochs on 2,048 training images.
``full``
    Nothing is run: under ``out/mae-fig9/`` the MAE ViT-L pre-training at 800 epochs
    (``pretrain/configs/mae_vit-l_in1k_1600ep.py``, ``schedule.epochs=800``: Table 1's model) as in
    ``reproduce ddae --scale full`` (:mod:`mimbench.jobs`), then per sweep point its resolved fine-tune config
    (``eval_configs/finetune/mae_vit-l_in1k.py`` + the point's overrides), a Slurm script and a ``torchrun`` line in
    ``commands.sh``, and last ``python -m mimbench.partial_ft "$RUNS"``, which collects the records into the table
    and the figure (:func:`collect`). ``ENCODER`` may name the official MAE ViT-L checkpoint instead of the
    pre-training's output (1600 epochs: say so beside the numbers).

Layout under ``out/mae-fig9/`` (both scales): ``encoders/mae/`` (the pre-training), ``points/<point>/`` (one
fine-tune per point and length, ``<point>`` = ``k<K>_e<epochs>``, e.g. ``kmlp_e100``).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from mimbench.atomic import atomic_write_text
from mimbench.config import format_override, load_config
from mimbench.demo import FULL, QUICK
from mimbench.encoders import read_metadata
from mimbench.errors import MimbenchError
from mimbench.jobs import shell_words, write_point_files
from mimbench.paths import eval_config, relative
from mimbench.results.leaderboard import STANDARD_PROTOCOLS, load_leaderboard, partial_ft_protocol
from mimbench.results.plots import plot_partial_finetune
from mimbench.results.records import finished_record
from mimbench.steps import Evaluate, Pretrain, StepRunner, reuse_note, write_timings

PAPER = "mae-fig9"
#: The figure's points: the number of last blocks fine-tuned ("mlp": the last block's MLP half).
BLOCKS: tuple[int | str, ...] = (0, "mlp", 1, 2, 4, 6, 12, 18, 24)
#: The fine-tuning lengths of MAE's appendix A.1, the best of which each point reports.
PAPER_EPOCHS = (50, 100, 200)


@dataclass(frozen=True)
class SweepScale:
    """One size of the sweep: the pre-training (``pretrain_config`` below ``pretrain/configs/`` with
    ``pretrain`` overrides), the fine-tune config (``finetune_config`` below ``eval_configs/``), the lengths tried
    per point, the warm-up of every point (None: the config's) and ``evaluate`` overrides of every fine-tune."""

    name: str
    pretrain_config: str
    pretrain: tuple[str, ...]
    finetune_config: str
    epochs: tuple[int, ...]
    warmup_epochs: float | None = None
    evaluate: tuple[str, ...] = ()


SWEEP_SCALES = {
    "demo": SweepScale("demo", "mae_micro_fmnist.py", FULL.pretrain, "demo/finetune_fmnist.py", (1, 2, 4), 0.5),
    "quick": SweepScale("quick", "mae_micro_fmnist.py", QUICK.pretrain, "demo/finetune_fmnist.py", (1, 2), 0.5,
                        ("data.limit_train=2048",)),
    "full": SweepScale("full", "mae_vit-l_in1k_1600ep.py", ("schedule.epochs=800",), "finetune/mae_vit-l_in1k.py",
                       PAPER_EPOCHS),
}


def tick(trainable_blocks: int | str, depth: int | None = None) -> str:
    """The x label of a point: "0", "MLP", "1", ...; full fine-tuning "<depth>" (or "all" when unknown)."""
    if trainable_blocks == "mlp":
        return "MLP"
    if trainable_blocks == "all":
        return str(depth) if depth else "all"
    return str(trainable_blocks)


def _x(trainable_blocks: int | str) -> float:
    """Position on the figure's axis: 0 < MLP < 1 < 2 < ... < all."""
    if trainable_blocks == "mlp":
        return 0.5
    if trainable_blocks == "all":
        return math.inf
    return float(trainable_blocks)


def sweep_blocks(depth: int) -> list[int | str]:
    """The ``trainable_blocks`` values of the sweep on a ``depth``-block encoder: :data:`BLOCKS` up to ``depth``,
    ``depth`` itself as "all" (full fine-tuning)."""
    kept = [b for b in BLOCKS if b == "mlp" or b < depth]
    return kept + ["all"]


@dataclass(frozen=True)
class SweepPoint:
    """One fine-tune of the sweep: ``trainable_blocks`` for ``epochs`` (warm-up ``warmup_epochs``, None: the
    config's); ``label`` is its x tick."""

    trainable_blocks: int | str
    label: str
    epochs: int
    warmup_epochs: float | None = None

    @property
    def name(self) -> str:
        return f"k{self.label.lower()}_e{self.epochs}"

    @property
    def overrides(self) -> tuple[str, ...]:
        sets = [format_override("finetune.trainable_blocks", self.trainable_blocks),
                format_override("schedule.epochs", self.epochs)]
        if self.warmup_epochs is not None:
            sets.append(format_override("schedule.warmup_epochs", self.warmup_epochs))
        return tuple(sets)


def sweep_points(depth: int, epochs: Sequence[int], warmup_epochs: float | None = None) -> list[SweepPoint]:
    """Every (blocks, length) fine-tune of the sweep on a ``depth``-block encoder, in x order."""
    return [SweepPoint(b, tick(b, depth), int(e), warmup_epochs) for b in sweep_blocks(depth) for e in epochs]


# ------------------------------------------------------------------------------------ results
def best_per_point(records: Sequence[dict]) -> list[dict]:
    """Fine-tune records grouped by ``protocol.trainable_blocks``, in x order: per point ``trainable_blocks``,
    ``by_epochs`` (fine-tuning epochs -> top-1), the best ``top1`` and its ``best_epochs`` (a tie: the shorter),
    ``trained_params``."""
    rows: dict[str, dict] = {}
    for record in records:
        proto = record["protocol"]
        blocks = proto.get("trainable_blocks", "all")
        row = rows.setdefault(json.dumps(blocks), {"trainable_blocks": blocks, "by_epochs": {},
                                                   "trained_params": proto.get("trained_params")})
        row["by_epochs"][int(proto["epochs"])] = float(record["metrics"]["top1"])
    for row in rows.values():
        best = max(row["by_epochs"], key=lambda e: (row["by_epochs"][e], -e))
        row.update(best_epochs=best, top1=row["by_epochs"][best])
    return sorted(rows.values(), key=lambda r: _x(r["trainable_blocks"]))


def paper_points() -> tuple[dict[str, float], dict[str, float]]:
    """``(tick -> MAE ViT-L top-1, line label -> value)``: the leaderboard's Figure 9 points stated in the text
    (protocols :func:`~mimbench.results.leaderboard.partial_ft_protocol`) and MoCo v3's ViT-L linear probe."""
    board = load_leaderboard()
    mae = board[(board["method"] == "MAE") & (board["arch"] == "vit-l/16") & (board["task"] == "finetune")]
    points = {}
    for blocks in BLOCKS:
        hit = mae[mae["protocol"] == partial_ft_protocol(blocks)]
        if len(hit):
            points[tick(blocks)] = float(hit["value"].iloc[0])
    moco = board[(board["method"] == "MoCo v3") & (board["arch"] == "vit-l/16") & (board["task"] == "linear")
                 & (board["protocol"] == STANDARD_PROTOCOLS["linear"])]
    lines = {"MoCo v3 ViT-L linear (paper)": float(moco["value"].iloc[0])} if len(moco) else {}
    return points, lines


def tabulate(rows: Sequence[dict], depth: int | None, paper: dict[str, float]) -> str:
    """Markdown: one line per point with top-1 at every length, the best and the paper's value where stated."""
    lengths = sorted({e for r in rows for e in r["by_epochs"]})
    head = ["blocks fine-tuned", "trainable_blocks", "trained params"] + [f"top-1 @{e} ep" for e in lengths] + \
        ["best top-1 (epochs)", "paper (ViT-L, IN-1k)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = tick(r["trainable_blocks"], depth)
        cells = [label, str(r["trainable_blocks"]), f"{r['trained_params']:,}" if r["trained_params"] else "-"]
        cells += [f"{r['by_epochs'][e]:.2f}" if e in r["by_epochs"] else "-" for e in lengths]
        cells += [f"{r['top1']:.2f} ({r['best_epochs']})", f"{paper[label]:g}" if label in paper else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text, what="a reproduce file", fix="Pass an --out folder you can write to.")


def write_results(root: Path, records: Sequence[dict], *, depth: int | None, scale: str, note: str = "") -> Path:
    """``table.md``, ``results.json`` and ``fig9.png`` under ``root`` from the sweep's fine-tune records; returns
    the table's path. The paper's points go on the figure at full scale only (a demo is another regime)."""
    rows = best_per_point(records)
    paper, lines = paper_points()
    full = scale == "full"
    text = (f"# MAE Figure 9: partial fine-tuning, {scale} scale\n\n" + tabulate(rows, depth, paper)
            + "\nEach point fine-tunes the last blocks (and the final norm and head) at every length tried; the best "
              "top-1 on val is the point, as in MAE's appendix A.1. Paper column: MAE ViT-L on ImageNet-1k, the "
              "points its text states" + ("" if full else "; a reference for the shape of the curve, not "
                                                         "comparable with demo-scale numbers") + ". "
            + "".join(f"{name}: {value:g}. " for name, value in lines.items()) + "\n" + (f"\n{note}\n" if note else ""))
    _write(root / "table.md", text)
    _write(root / "results.json", json.dumps(rows, indent=1, sort_keys=True))
    plot_partial_finetune([(tick(r["trainable_blocks"], depth), r["top1"], r["best_epochs"]) for r in rows],
                          root / "fig9.png", title=f"MAE Figure 9 ({scale} scale)",
                          paper=paper if full else None, lines=lines if full else None)
    return root / "table.md"


def collect(root: str | Path, scale: str = "full") -> Path:
    """The table and figure of a sweep from the finished fine-tune records under ``root/points/`` (a full-scale
    sweep after its jobs ran: ``python -m mimbench.partial_ft "$RUNS"``; ``scale`` names the sweep's scale);
    returns the table's path."""
    root = Path(root)
    records = []
    for folder in sorted((root / "points").iterdir()) if (root / "points").is_dir() else []:
        for where in sorted({p.parent for p in folder.rglob("*.json")}):
            record = finished_record(where)
            if record is not None and record.get("task") == "finetune":
                records.append(record)
                break
    if not records:
        raise MimbenchError(f"No finished fine-tune record under {root / 'points'}.",
                            "Run the sweep's jobs (commands.sh) first, then collect again.")
    return write_results(root, records, depth=None, scale=scale)


# ------------------------------------------------------------------------------------ running
class _SweepRunner(StepRunner):
    """The sweep's steps: the one encoder registered once per point (its name = the point's), so that the points are
    independent steps that run side by side, each writing to ``points/<point>/evals/<encoder>/finetune``."""

    def __init__(self, root: Path, encoder: str, **kwargs):
        super().__init__(root, **kwargs)
        self.encoder = encoder

    def eval_dir(self, encoder: str, task: str) -> Path:
        return self.root / "points" / encoder / "evals" / self.encoder / task


def run_demo_sweep(grid, sweep: SweepScale, out: Path, log: Callable[[str], None] = print, jobs: int = 1) -> Path:
    """Pre-train the grid's one encoder (``grid.points[0]`` + the sweep's budget), fine-tune it at every sweep
    point (``jobs`` of them side by side), write the results; steps are reused as :mod:`mimbench.steps` says.
    Returns the table's path."""
    root = Path(out) / PAPER
    point = grid.points[0]
    encoder = StepRunner(root, log=log).run(
        [Pretrain(point.name, grid.base_paths[point.base], tuple(point.overrides) + sweep.pretrain)])[0]
    depth = int(read_metadata(encoder.path)["depth"])
    config = eval_config(sweep.finetune_config)
    runner = _SweepRunner(root, point.name, log=log)
    fines = sweep_points(depth, sweep.epochs, sweep.warmup_epochs)
    for fine in fines:
        runner.encoders[fine.name] = encoder.path  # the one pre-trained encoder, made above
    done = runner.run([Evaluate(fine.name, "finetune", config, fine.overrides + sweep.evaluate) for fine in fines],
                      jobs=jobs)
    write_timings([encoder, *done], root / "steps.csv")
    return write_results(root, [d.record for d in done], depth=depth, scale=sweep.name,
                         note=reuse_note([encoder, *done]))


FINETUNE_SBATCH = """#!/bin/bash
# Partial fine-tune {name} of MAE Figure 9. Edit the #SBATCH values and the variables below for your cluster.
#SBATCH --job-name=mae-fig9-{name}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8         # the config fixes the effective batch: any GPU count trains the same recipe
#SBATCH --time=72:00:00
#SBATCH --partition=gpu
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail

IMAGENET=${{IMAGENET:-/path/to/imagenet}}   # ImageNet-1k root with train/<class>/*, val/<class>/*
RUNS=${{RUNS:-runs/reproduce/mae-fig9}}
ENCODER=${{ENCODER:-$RUNS/encoders/mae/encoder.safetensors}}   # or the official MAE ViT-L checkpoint
torchrun --nproc_per_node=8 {command}
"""


def _finetune_words(config: str, fine: SweepPoint) -> list[str]:
    words = ["-m", "mimbench.cli", "eval", "finetune", "--encoder", "$ENCODER", "--config", config,
             "--data", "$IMAGENET", "--out", f"$RUNS/points/{fine.name}"]
    for item in fine.overrides:
        words += ["--set", item]
    return words


def write_full_sweep(grid, sweep: SweepScale, out: Path, depth: int) -> Path:
    """The job files of the full-scale sweep (module docstring) of a ``depth``-block encoder under
    ``out/mae-fig9/``; returns that folder."""
    root = Path(out) / PAPER
    for sub in ("configs", "sbatch"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    point = grid.points[0]
    pretrain = write_point_files(root, PAPER, grid.base_paths[point.base], point)
    config = eval_config(sweep.finetune_config)
    commands = ["#!/bin/bash", "# MAE Figure 9 (partial fine-tuning) at full scale: ViT-L/16, ImageNet-1k, 8 GPUs.",
                "set -euo pipefail", "IMAGENET=${IMAGENET:-/path/to/imagenet}", "RUNS=${RUNS:-runs/reproduce/mae-fig9}",
                "ENCODER=${ENCODER:-$RUNS/encoders/mae/encoder.safetensors}   # or the official MAE ViT-L checkpoint",
                "", "# ---- pre-training (skip it when ENCODER names a pre-trained ViT-L)",
                "torchrun --nproc_per_node=8 " + shell_words(pretrain), "",
                "# ---- the sweep: every point at 50, 100 and 200 epochs"]
    for fine in sweep_points(depth, sweep.epochs, sweep.warmup_epochs):
        cfg = load_config(config, fine.overrides, kind="finetune")  # refuses a bad override before writing
        _write(root / "configs" / f"{fine.name}.py",
               f"# Partial fine-tune {fine.name!r} of MAE Figure 9.\n# Base: {relative(config)}\n"
               f"# Overrides: {' '.join(fine.overrides)}\n" + cfg.pretty_text + "\n")
        line = shell_words(_finetune_words(relative(config), fine))
        script = root / "sbatch" / f"{fine.name}.sbatch"
        _write(script, FINETUNE_SBATCH.format(name=fine.name, command=line))
        script.chmod(0o755)
        commands.append("torchrun --nproc_per_node=8 " + line)
    commands += ["", "# ---- the curve: the best length per point -> table.md, results.json, fig9.png",
                 'python -m mimbench.partial_ft "$RUNS"']
    _write(root / "commands.sh", "\n".join(commands) + "\n")
    (root / "commands.sh").chmod(0o755)
    return root


def run_sweep(grid, scale: str, out: Path, depth: int, log: Callable[[str], None] = print, jobs: int = 1) -> Path:
    """Run (``demo``, ``quick``; ``jobs`` fine-tunes side by side) or write out (``full``) the sweep of ``grid``,
    whose encoder has ``depth`` blocks (the demo reads it from the pre-trained file); returns the output folder."""
    sweep = SWEEP_SCALES[scale]
    if scale == "full":
        root = write_full_sweep(grid, sweep, out, depth)
        log(f"MAE Figure 9 sweep: configs in {root / 'configs'}, Slurm scripts in {root / 'sbatch'}, all commands "
            f"in {root / 'commands.sh'} (nothing was run).")
        return root
    table = run_demo_sweep(grid, sweep, out, log=log, jobs=jobs)
    log(table.read_text())
    log(f"table written to {table}, figure {table.parent / 'fig9.png'}")
    return table.parent


if __name__ == "__main__":  # python -m mimbench.partial_ft RUNS: the last line of the full-scale commands.sh
    print(f"written: {collect(sys.argv[1] if len(sys.argv) > 1 else Path('runs/reproduce') / PAPER)}")
