"""Job files for a cluster: the full-scale grid of ``mimbench reproduce --scale full`` as commands.

For each pre-training point of a grid (:class:`mimbench.reproduce.Grid`) it writes, under ``out/<paper>/``:
``configs/<point>.py`` (the resolved config, for the record), ``sbatch/<point>.sbatch`` (a Slurm script
that runs ``torchrun`` on every node of the allocation, rendezvous on the first) and one ``commands.sh``
with the single-node ``torchrun`` pre-training lines, then the evaluations of every encoder
(:func:`full_evals`: the tasks whose entry names full-scale data - ImageNet-1k linear probe and fine-tune,
ADE20K UperNet), then the report. Nothing is run.
Paths inside are repository-relative and data roots are shell variables (``$IMAGENET``, ``$ADE20K``); the
layout under ``$RUNS`` is the demo grid's (``encoders/<point>/``, ``evals/<point>/<task>/``), so an override
naming an earlier point's file as ``{runs}/<point>/<file>`` reads ``$RUNS/encoders/<point>/<file>``.
"""
from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from mimbench.atomic import atomic_write_text
from mimbench.config import load_config
from mimbench.evals.tasks import all_tasks, get_task
from mimbench.paths import EVAL_CONFIGS, relative
from mimbench.steps import expand_runs


def full_evals() -> tuple[tuple[str, str, str], ...]:
    """(task, protocol config relative to the repository root, data variable) of every task in the job grid."""
    return tuple((task.name, str(EVAL_CONFIGS / task.protocol_config), task.full_data)
                 for task in all_tasks() if task.full_data is not None)


SBATCH_HEAD = """#!/bin/bash
# Pre-training of grid point {name} ({paper}). Edit the #SBATCH values and the variables below for your cluster.
#SBATCH --job-name={paper}-{name}
#SBATCH --nodes=1                 # NODES: nodes for this job (see the batch note below)
#SBATCH --gpus-per-node=8         # GPUS_PER_NODE: must equal GPUS_PER_NODE below
#SBATCH --time=72:00:00           # TIME: wall-clock limit
#SBATCH --partition=gpu           # PARTITION: your GPU partition
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=8
IMAGENET=${{IMAGENET:-/path/to/imagenet}}   # ImageNet-1k root with train/<class>/*, val/<class>/*
RUNS=${{RUNS:-runs/reproduce/{paper}}}

# Batch: the config fixes the effective batch (optim.eff_batch_size; the gradient accumulation follows from
# the number of processes), so any node count trains the same recipe.
# One torchrun per node; rendezvous on the first node of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
"""


def _pretrain_args(config: str, point) -> list[str]:
    args = ["-m", "mimbench.cli", "pretrain", "--config", config, "--data", "$IMAGENET",
            "--out", f"$RUNS/encoders/{point.name}"]
    for o in point.overrides:
        args += ["--set", o]
    return args


def shell_words(args: Sequence[str]) -> str:
    """Shell words; $VARIABLES stay expandable (double quotes, also inside an override such as
    ``model.tokenizer="$RUNS/..."``), everything else is quoted literally."""
    def word(a: str) -> str:
        if "$" not in a:
            return shlex.quote(a)
        return '"' + "".join("\\" + c if c in '"\\`' else c for c in a) + '"'

    return " ".join(word(a) for a in args)


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text, what="a job file", fix="Pass an --out folder you can write to.")


def _commands_head(paper: str) -> list[str]:
    return [
        "#!/bin/bash",
        f"# {paper}: full-scale ablation grid (ViT-B/16, ImageNet-1k pre-training, 8 GPUs per node).",
        "# Set the data roots, then run the pre-training lines (or submit sbatch/*.sbatch), then the evaluations.",
        "set -euo pipefail",
        "IMAGENET=${IMAGENET:-/path/to/imagenet}",
        "ADE20K=${ADE20K:-/path/to/ADEChallengeData2016}",
        f"RUNS=${{RUNS:-runs/reproduce/{paper}}}",
        "",
        "# ---- pre-training (single node, 8 GPUs)",
    ]


def write_point_files(root: Path, paper: str, base: Path, point) -> list[str]:
    """configs/<point>.py and sbatch/<point>.sbatch of one pre-training point; returns its pre-training args."""
    cfg = load_config(base, point.overrides)  # refuses unknown keys before anything is written
    rel_base = relative(base)
    header = (f"# Resolved config of grid point {point.name!r} ({paper}).\n"
              f"# Base: {rel_base}\n# Overrides: {' '.join(point.overrides) or '(none)'}\n")
    _write(root / "configs" / f"{point.name}.py", header + cfg.pretty_text + "\n")
    args = _pretrain_args(rel_base, point)
    sbatch = SBATCH_HEAD.format(name=point.name, paper=paper)
    sbatch += ('srun torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" '
               '--rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:29500" \\\n    '
               + shell_words(args) + "\n")
    sbatch_path = root / "sbatch" / f"{point.name}.sbatch"
    _write(sbatch_path, sbatch)
    sbatch_path.chmod(0o755)
    return args


def _eval_lines(point_name: str) -> list[str]:
    """The full-scale evaluation commands of one encoder, one per task of :func:`full_evals`."""
    encoder = f"$RUNS/encoders/{point_name}/encoder.safetensors"
    lines = []
    for task, config, data in full_evals():
        words = ["-m", "mimbench.cli", "eval", task, "--encoder", encoder, "--config", config, "--data", data,
                 "--out", f"$RUNS/evals/{point_name}/{task}", *get_task(task).full_options]
        lines.append("torchrun --nproc_per_node=8 " + shell_words(words))
    return lines


def write_full_grid(grid, out: Path) -> Path:
    """Write configs/<point>.py, sbatch/<point>.sbatch and commands.sh under out/<paper>/; return that folder."""
    root = Path(out) / grid.paper
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "sbatch").mkdir(parents=True, exist_ok=True)
    commands = _commands_head(grid.paper)
    evals = ["", "# ---- evaluation of every pre-trained encoder"]
    for point in grid.points:
        if not point.pretrain:  # the random-initialisation control is a demo-scale sanity row
            continue
        point = replace(point, overrides=expand_runs(point.overrides, "$RUNS/encoders"))
        args = write_point_files(root, grid.paper, grid.base_paths[point.base], point)
        commands += [f"# {point.name}", "torchrun --nproc_per_node=8 " + shell_words(args)]
        if point.evaluate:  # a prerequisite (BEiT v2's tokenizer) is not evaluated
            evals += _eval_lines(point.name)
    # Every point records its own technique name, so one report keeps them apart.
    evals += ["", 'mimbench report "$RUNS" --format md']
    path = root / "commands.sh"
    _write(path, "\n".join(commands + evals) + "\n")
    path.chmod(0o755)
    return root


__all__ = ["SBATCH_HEAD", "full_evals", "shell_words", "write_full_grid", "write_point_files"]
