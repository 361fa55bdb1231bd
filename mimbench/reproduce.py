"""``mimbench reproduce <paper> --scale demo|full``: the ablation grids of the two seed papers.

A grid is a list of *points*; each point is a name, a base pre-training config and the ``--set``
overrides applied to it. Every row of the paper-style table names the factor it ablates and the
point it reads its numbers from, so that a setting shared by several factors (the baseline) is
trained once.

Grids (this project's reading of the papers; only their abstracts and introductions are known):

robust-mae
    Starting point: plain MAE with per-patch normalised targets (the official recipe,
    ``target_norm='patch'``), then one factor at a time: decoder attention dropout rate
    (0, 0.1, 0.2); target normalisation (none, patch, batch, ema); encoder mask tokens
    inserted after layer 0, depth/2 or depth for a ratio 0.5 or 1 of the masked positions (ratio 0
    is plain MAE whatever the layer, so it is the baseline once); and the three ingredients
    together (the ``robust_*`` recipe values). The paper reports no numbers we have: trends only.
ddae
    MAE, MAE+DDS (the plug-in), full DDAE, and DDAE without each ingredient: no deep supervision
    (last layer only), no dynamic weighting (beta fixed at 0), a scheduled instead of learnable
    beta, no self-distillation. The paper's ImageNet-1k ViT-B/16 numbers (fine-tune 83.5 at 100
    epochs, 84.3 longer; ADE20K UperNet 49.3 mIoU) are printed as a reference column for the
    full DDAE row only; they are never comparable with demo-scale numbers.
mae-fig9
    MAE's partial fine-tuning curve (Figure 9): one MAE pre-training, then fine-tunes of its last K blocks
    (K in 0, last MLP, 1, 2, 4, 6, 12, 18, 24 up to the depth) at three lengths each, the best per K drawn against
    K; the sweep is :mod:`mimbench.partial_ft` (``--scale demo``: the demo's micro encoder; ``full``: ViT-L job
    files).

``scale="demo"`` trains every point on the embedded Fashion-MNIST subset at CPU size (k-NN and
the demo linear probe) as steps of :mod:`mimbench.steps` -- the control is built by
:mod:`mimbench.control`, and a step is reused only when its config, overrides and encoder match --
and writes the tables; ``scale="full"`` runs nothing and writes, per point, the resolved config, the
``torchrun`` pre-training command, a Slurm script and the evaluation commands for ImageNet-1k / ADE20K
(:mod:`mimbench.jobs`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from mimbench import paths
from mimbench.atomic import atomic_write_text
from mimbench.config import format_override, load_config
from mimbench.errors import MimbenchError
from mimbench.evals.tasks import all_tasks
from mimbench.jobs import write_full_grid
from mimbench.partial_ft import SWEEP_SCALES, run_sweep, sweep_blocks, tick
from mimbench.steps import Control, Evaluate, Pretrain, StepRunner, default_jobs, reuse_note, write_timings
from pretrain.models.mae import PRESETS, ROBUST_RECIPE

PAPERS = ("robust-mae", "ddae", "mae-fig9")
SCALES = ("demo", "full")

# Base pre-training configs (repository-relative), first existing one wins. "mae" is plain MAE,
# "ddae" the full DDAE; each grid point names one of these roles.
BASE_CONFIGS: dict[str, dict[str, tuple[str, ...]]] = {
    "demo": {
        "mae": ("pretrain/configs/mae_tiny_fmnist.py",),
        "mae_dds": ("pretrain/configs/mae-dds_tiny_fmnist.py",),
        "ddae": ("eval_configs/reproduce/ddae_tiny_fmnist.py",),
        "vqkd": ("pretrain/configs/vqkd_tiny_fmnist.py",),
        "beitv2": ("pretrain/configs/beitv2_tiny_fmnist.py",),
        "beitv2_dds": ("pretrain/configs/beitv2-dds_tiny_fmnist.py",),
    },
    "quick": {
        "mae": ("pretrain/configs/mae_micro_fmnist.py",),
        "mae_dds": ("eval_configs/reproduce/mae-dds_micro_fmnist.py",),
        "ddae": ("eval_configs/reproduce/ddae_micro_fmnist.py",),
        "vqkd": ("pretrain/configs/vqkd_tiny_fmnist.py",),
        "beitv2": ("pretrain/configs/beitv2_tiny_fmnist.py",),
        "beitv2_dds": ("pretrain/configs/beitv2-dds_tiny_fmnist.py",),
    },
    "full": {
        "mae": ("pretrain/configs/mae_vit-b_in1k_800ep.py",),
        "mae_dds": ("pretrain/configs/mae-dds_vit-b_in1k_800ep.py",),
        "ddae": ("eval_configs/reproduce/ddae_vit-b_in1k_100ep.py",),
        # BEiT v2 at full scale takes the official VQ-KD tokenizer (model.tokenizer in the config).
        "beitv2": ("pretrain/configs/beitv2_vit-b_in1k_300ep.py",),
        "beitv2_dds": ("pretrain/configs/beitv2-dds_vit-b_in1k_300ep.py",),
    },
}
# (eval_configs/reproduce/ddae_*.py inherit pretrain/configs/ddae_*.py and write out the DDAE knobs the grid
# varies at the model's defaults, so that the grid can --set them.)



def demo_evals() -> tuple[tuple[str, str], ...]:
    """(task, demo config relative to the repository root) of the tasks a demo-scale grid runs at every point
    (the entries with ``in_grid_demo``: k-NN and the demo linear probe)."""
    return tuple((t.name, str(paths.EVAL_CONFIGS / t.demo_config)) for t in all_tasks() if t.in_grid_demo)


# Numbers the DDAE paper reports (ViT-B/16, ImageNet-1k pre-training): reference only.
DDAE_PAPER = {"finetune IN-1k @100ep": 83.5, "finetune IN-1k longer": 84.3, "ADE20K mIoU": 49.3}


@dataclass(frozen=True)
class GridPoint:
    """One pre-training run: ``base`` is a key of BASE_CONFIGS[scale]; ``overrides`` are ``--set`` strings."""

    name: str
    base: str
    overrides: tuple[str, ...]
    paper: dict = field(default_factory=dict)
    pretrain: bool = True  # False: the control, the base model's encoder at its random initialisation
    # False: a prerequisite that writes no encoder (BEiT v2's tokenizer): trained, never evaluated. Overrides may
    # name files of earlier points as {runs}/<point>/<file> ({runs}: the folder of every point's pre-training
    # folder; the step runner and the job writer substitute it, see mimbench.steps.expand_runs).
    evaluate: bool = True


@dataclass(frozen=True)
class Row:
    """One table row: the ablated ``factor``, the ``setting`` shown, and the grid point it reads."""

    factor: str
    setting: str
    point: str


# Demo-scale control: what the evaluations give without any pre-training (at CPU size a linear probe on
# random features is already strong, so every number needs this row beside it).
RANDOM_INIT = GridPoint("random_init", "mae", (), pretrain=False)
CONTROL_ROW = Row("control", "random init (no pre-training)", "random_init")


@dataclass(frozen=True)
class Grid:
    paper: str
    points: tuple[GridPoint, ...]
    rows: tuple[Row, ...]
    base_paths: dict


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text, what="a reproduce file", fix="Pass an --out folder you can write to.")


def _set(key_prefix: str, **knobs) -> tuple[str, ...]:
    return tuple(format_override(f"{key_prefix}{k}", v) for k, v in knobs.items())


def _find_base(scale: str, role: str) -> Path:
    for rel in BASE_CONFIGS[scale][role]:
        if paths.shipped_path(rel).is_file():
            return paths.shipped_path(rel)
    raise MimbenchError(
        f"No {role} pre-training config for scale {scale!r} was found (looked for: "
        f"{', '.join(BASE_CONFIGS[scale][role])}).",
        "Reinstall mimbench (pip install mimbench-*.whl, or pip install -e . in a checkout): it ships these configs.",
    )


def _model_section(cfg, path: Path) -> dict:
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if not hasattr(model, "keys"):
        raise MimbenchError(f"Config {path} has no `model` section.", "Pre-training configs define model=dict(...).")
    return model


def _model_name_key(model, path: Path) -> str:
    for key in ("type", "name", "arch"):
        if key in model.keys() and isinstance(model[key], str):
            return key
    raise MimbenchError(f"Config {path} does not name its model (model.type).", "Set model=dict(type='mae_...').")


def _depth(model, name_key: str) -> int:
    if "depth" in model.keys():
        return int(model["depth"])

    name = model[name_key]
    for preset, args in PRESETS.items():
        if name.endswith(preset[len("mae_"):]):
            return int(args["depth"])
    raise MimbenchError(f"Cannot tell the encoder depth of model {name!r}.", "Give model.depth in the config.")


#: The keys of a pre-training budget (mimbench.schema: the ``schedule`` section of a pre-training config).
BUDGET_KEYS = ("schedule.epochs", "schedule.warmup_epochs")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


def _budget_overrides(target, source) -> tuple[str, ...]:
    """Overrides giving ``target`` the epochs / warm-up of ``source`` where both configs have the key."""
    out = []
    for key in BUDGET_KEYS:
        mine, theirs = _get(target, key), _get(source, key)
        if mine is not None and theirs is not None and mine != theirs:
            out.append(format_override(key, theirs))
    return tuple(out)


def _variant(name: str, base: str, cfg, overrides: tuple[str, ...]) -> GridPoint:
    """A grid point that changes its base: its encoder records ``technique (name)`` so that reports keep
    the grid points apart (they group runs by technique and epochs)."""
    if "technique" in cfg.keys():
        overrides = overrides + (format_override("technique", f"{cfg.technique} ({name})"),)
    return GridPoint(name, base, overrides)


@dataclass(frozen=True)
class _Bases:
    """The base configs of one grid: ``which`` scale ("demo", "quick", "full"), ``given`` role -> file."""

    which: str
    given: dict | None

    def path(self, role: str) -> Path:
        if self.given is not None and role in self.given:
            return Path(self.given[role])
        return _find_base(self.which, role)


def build_grid(paper: str, scale: str = "demo", quick: bool = False, bases: dict | None = None) -> Grid:
    """The grid of ``paper`` against the base configs of ``scale`` (``quick``: the smallest demo configs).

    ``bases`` maps the roles ``"mae"``/``"ddae"`` to config files instead of the repository's.
    Depth-relative settings (mask-token layer depth/2, the DDS depths) are read from the base config.
    """
    paper = _check_paper(paper)
    found = _Bases("full" if scale == "full" else ("quick" if quick else "demo"), bases)
    if paper == "mae-fig9":
        return _fig9_grid(found)
    mae_path = found.path("mae")
    mae_cfg = load_config(mae_path)
    mae_model = _model_section(mae_cfg, mae_path)
    depth = _depth(mae_model, _model_name_key(mae_model, mae_path))
    if paper == "robust-mae":
        return _robust_mae_grid(mae_path, mae_cfg, depth)
    return _ddae_grid(found, mae_path, depth)


def _robust_mae_grid(mae_path: Path, mae_cfg, depth: int) -> Grid:
    """Plain MAE, then one factor at a time (decoder attention dropout, target normalisation, mask tokens)
    and the three together; a setting several factors share is one point."""

    plain = dict(decoder_attn_drop=0.0, target_norm="patch", mask_token_layer=depth, mask_token_ratio=0.0)
    if "norm_pix_loss" in mae_cfg.model.keys():  # the legacy flag would conflict with target_norm != "patch"
        plain = {"norm_pix_loss": False, **plain}
    points: dict[str, GridPoint] = {"random_init": RANDOM_INIT, "mae": GridPoint("mae", "mae", _set("model.", **plain))}
    rows: list[Row] = [CONTROL_ROW]

    def add(factor: str, setting: str, name: str, **change) -> None:
        over = _set("model.", **{**plain, **change})
        same = [p.name for p in points.values() if p.overrides == over]  # one run per distinct setting
        if same:
            name = same[0]
        else:
            points[name] = _variant(name, "mae", mae_cfg, over)
        rows.append(Row(factor, setting, name))

    for rate in (0.0, 0.1, 0.2):
        add("decoder attention dropout", f"{rate:g}", f"attn_drop{rate:g}", decoder_attn_drop=rate)
    for mode in ("none", "patch", "batch", "ema"):
        add("target normalisation", mode, f"target_{mode}", target_norm=mode)
    add("mask tokens (layer, ratio)", "(any, 0) = MAE", "mask_tokens_none", mask_token_ratio=0.0)
    for layer in sorted({0, depth // 2, depth}):
        for ratio in (0.5, 1.0):
            add("mask tokens (layer, ratio)", f"({layer}, {ratio:g})", f"mask_tokens_l{layer}_r{ratio:g}",
                mask_token_layer=layer, mask_token_ratio=ratio)
    recipe = {k: v for k, v in ROBUST_RECIPE.items() if k in plain}
    recipe.setdefault("mask_token_layer", depth // 2)
    add("all three", "MAE", "mae")
    add("all three", "robust recipe (" + ", ".join(f"{k}={v}" for k, v in recipe.items()) + ")",
        "robust_recipe", **recipe)
    return Grid("robust-mae", tuple(points.values()), tuple(rows), {"mae": mae_path})


DDAE_ROWS = (
    CONTROL_ROW,
    Row("plug-in", "MAE", "mae"),
    Row("plug-in", "MAE + DDS", "mae_dds"),
    Row("plug-in", "BEiT v2", "beitv2"),
    Row("plug-in", "BEiT v2 + DDS", "beitv2_dds"),
    Row("deep supervision", "on (DDAE)", "ddae"),
    Row("deep supervision", "off (last layer only)", "ddae_no_deep_supervision"),
    Row("dynamic weighting", "learnable beta (DDAE)", "ddae"),
    Row("dynamic weighting", "scheduled beta", "ddae_scheduled_beta"),
    Row("dynamic weighting", "off (beta = 0)", "ddae_no_dynamic_weighting"),
    Row("self-distillation", "on (DDAE)", "ddae"),
    Row("self-distillation", "off", "ddae_no_self_distillation"),
)


def _ddae_ablations(ddae_path: Path, ddae_cfg, depth: int) -> list[GridPoint]:
    """Full DDAE (with the paper's numbers) and DDAE without each ingredient."""
    ddae_model = _model_section(ddae_cfg, ddae_path)
    last = [depth]
    no_dds = dict(dds_depths=last)
    if ddae_model.get("distill_depths") is not None:  # an explicit list must stay a subset of dds_depths
        no_dds["distill_depths"] = last
    if ddae_model.get("dds_weights") is not None:  # one weight per supervised depth
        no_dds["dds_weights"] = [1.0]
    m = "model."
    return [
        GridPoint("ddae", "ddae", (), {f"paper (IN-1k) {k}": v for k, v in DDAE_PAPER.items()}),
        _variant("ddae_no_deep_supervision", "ddae", ddae_cfg, _set(m, **no_dds)),
        _variant("ddae_no_dynamic_weighting", "ddae", ddae_cfg, _set(m, dds_beta_mode="fixed", dds_beta_start=0.0)),
        _variant("ddae_scheduled_beta", "ddae", ddae_cfg, _set(m, dds_beta_mode="scheduled")),
        _variant("ddae_no_self_distillation", "ddae", ddae_cfg, _set(m, distill_weight=0.0)),
    ]


def _tokenizer_plugins(found: _Bases, ddae_cfg) -> tuple[list[GridPoint], dict]:
    """The tokenizer plug-in points (BEiT v2, BEiT v2 + DDS) at the DDAE config's budget, and their base paths.

    At demo scale their VQ-KD tokenizer is trained first with the "mae" point's encoder as teacher; at full
    scale the configs take the official tokenizer."""
    beit_paths = {role: found.path(role) for role in ("beitv2", "beitv2_dds")}
    points, beit_tok = [], ()
    if found.which != "full":
        beit_paths["vqkd"] = found.path("vqkd")
        points = [GridPoint("vqkd", "vqkd", _budget_overrides(load_config(beit_paths["vqkd"]), ddae_cfg)
                            + ('model.teacher="{runs}/mae/encoder.safetensors"',), evaluate=False)]
        beit_tok = ('model.tokenizer="{runs}/vqkd/tokenizer.safetensors"',)
    points += [GridPoint(name, name, _budget_overrides(load_config(beit_paths[name]), ddae_cfg) + beit_tok)
               for name in ("beitv2", "beitv2_dds")]
    return points, beit_paths


def _ddae_grid(found: _Bases, mae_path: Path, depth: int) -> Grid:
    """The plug-in rows (MAE, MAE + DDS, BEiT v2 +/- DDS) and the DDAE ablations, all at the DDAE budget."""
    ddae_path, mae_dds_path = found.path("ddae"), found.path("mae_dds")
    ddae_cfg = load_config(ddae_path)
    beit_points, beit_paths = _tokenizer_plugins(found, ddae_cfg)
    points = [
        RANDOM_INIT,
        # An ablation compares equal budgets: the MAE rows get the DDAE config's schedule where they differ.
        GridPoint("mae", "mae", _budget_overrides(load_config(mae_path), ddae_cfg)),
        GridPoint("mae_dds", "mae_dds", _budget_overrides(load_config(mae_dds_path), ddae_cfg)),
        *beit_points,
        *_ddae_ablations(ddae_path, ddae_cfg, depth),
    ]
    return Grid("ddae", tuple(points), DDAE_ROWS,
                {"mae": mae_path, "mae_dds": mae_dds_path, "ddae": ddae_path, **beit_paths})


def _fig9_base(found: _Bases) -> Path:
    """The pre-training config of the Figure 9 sweep (``bases["mae"]`` when given, else the sweep scale's)."""
    if found.given is not None and "mae" in found.given:
        return Path(found.given["mae"])
    rel = Path("pretrain/configs") / SWEEP_SCALES[found.which].pretrain_config
    if not paths.shipped_path(rel).is_file():
        raise MimbenchError(f"No pre-training config for scale {found.which!r} of mae-fig9 was found (looked for: "
                            f"{rel}).", "Reinstall mimbench (pip install mimbench-*.whl, or pip install -e . in a "
                            "checkout): it ships these configs.")
    return paths.shipped_path(rel)


def _fig9_grid(found: _Bases) -> Grid:
    """One pre-training (MAE; at full scale Table 1's 800 epochs), one row per point of the fine-tuning sweep
    (:mod:`mimbench.partial_ft`), all reading that encoder."""
    base = _fig9_base(found)
    depth = _config_depth(base)
    overrides = SWEEP_SCALES[found.which].pretrain if found.which == "full" else ()  # demo budgets: at run time
    rows = tuple(Row("blocks fine-tuned", tick(b, depth), "mae") for b in sweep_blocks(depth))
    return Grid("mae-fig9", (GridPoint("mae", "mae", tuple(overrides)),), rows, {"mae": base})


def _config_depth(path: Path) -> int:
    """The encoder depth of the pre-training config at ``path``."""
    model = _model_section(load_config(path), path)
    return _depth(model, _model_name_key(model, path))


def _check_paper(paper: str) -> str:
    if paper not in PAPERS:
        raise MimbenchError(f"Unknown paper {paper!r}.", f"Known papers: {', '.join(PAPERS)}.")
    return paper


# ------------------------------------------------------------------------------------ demo
def _headline(metrics: dict) -> float | None:
    """The accuracy-like number of a record's metrics (top-1 in %)."""
    for key in ("top1", "acc1", "accuracy", "acc", "top1_acc"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and "top1" in key:
            return float(value)
    return None


def tabulate(grid: Grid, results: dict[str, dict[str, float | None]], columns: Sequence[str]) -> str:
    """Markdown table in the paper's layout: one block of rows per ablated factor."""
    paper_cols = sorted({k for p in grid.points for k in p.paper})
    by_name = {p.name: p for p in grid.points}
    head = ["factor", "setting", "run"] + [f"{c} (demo)" for c in columns] + paper_cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = None
    for row in grid.rows:
        res = results.get(row.point, {})
        cells = [row.factor if row.factor != previous else "", row.setting, row.point]
        cells += ["-" if res.get(c) is None else f"{res[c]:.2f}" for c in columns]
        cells += [f"{by_name[row.point].paper[c]:g}" if c in by_name[row.point].paper else "" for c in paper_cols]
        lines.append("| " + " | ".join(cells) + " |")
        previous = row.factor
    if paper_cols:
        lines.append("")
        lines.append("Paper columns: ViT-B/16 pre-trained on ImageNet-1k, as reported by the paper; a reference "
                     "for the shape of the result, not comparable with the demo-scale numbers.")
    return "\n".join(lines) + "\n"


def grid_steps(grid: Grid, points: Iterable[str] | None = None, pretrain_overrides: Sequence[str] = ()) -> list:
    """The demo-scale grid as steps (:mod:`mimbench.steps`): per point, its pre-training (or, for the control,
    the base config's model at initialisation) and, unless it is a prerequisite (``evaluate=False``), the
    :func:`demo_evals` evaluations."""
    wanted = None if points is None else set(points)
    steps = []
    for point in grid.points:
        if wanted is not None and point.name not in wanted:
            continue
        config = grid.base_paths[point.base]
        overrides = tuple(point.overrides) + tuple(pretrain_overrides)
        if point.pretrain:
            steps.append(Pretrain(point.name, config, overrides))
        else:
            steps.append(Control(point.name, config=config, overrides=overrides))
        if point.evaluate:
            steps += [Evaluate(point.name, task, paths.shipped_path(cfg)) for task, cfg in demo_evals()]
    return steps


def run_demo_grid(grid: Grid, out: Path, points: Iterable[str] | None = None, log=print,
                  pretrain_overrides: Sequence[str] = (), jobs: int = 1) -> Path:
    """Train and evaluate the grid's points (all, or those named), reuse finished steps, write table.md.

    Steps run through :class:`mimbench.steps.StepRunner` under ``out/<paper>/`` (encoders/, evals/): a step
    is reused only when its config, overrides and encoder match; table.md says which were.
    ``pretrain_overrides`` are appended to every point's (e.g. ``data.limit=512`` for a smoke run); ``jobs``
    steps run side by side (1: one after another in this process); steps.csv says how long each took.
    """
    root = Path(out) / grid.paper
    root.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(root, log=log)
    outcomes = runner.run(grid_steps(grid, points, pretrain_overrides), jobs=jobs)
    write_timings(outcomes, root / "steps.csv")
    results: dict[str, dict[str, float | None]] = {}
    for o in outcomes:
        if isinstance(o.step, Evaluate):
            results.setdefault(o.step.encoder, {})[o.step.task] = _headline((o.record or {}).get("metrics", {}))
    table = tabulate(grid, results, [task for task, _ in demo_evals()])
    note = reuse_note(outcomes)
    path = root / "table.md"
    _write(path, f"# {grid.paper} ablations, demo scale (Fashion-MNIST subset, CPU)\n\n" + table
           + (f"\n{note}\n" if note else ""))
    _write(root / "results.json", json.dumps(results, indent=1, sort_keys=True))
    return path


# ------------------------------------------------------------------------------------ entry
def run_reproduce(paper: str, scale: str = "demo", out: Path = Path("runs/reproduce"), quick: bool = False,
                  jobs: int | None = None) -> Path:
    """Run (``demo``) or write out (``full``) the ablation grid of ``paper``; returns the output folder.

    paper: ``"robust-mae"``, ``"ddae"`` or ``"mae-fig9"`` (:mod:`mimbench.partial_ft`); scale: ``"demo"`` (CPU,
    embedded data) or ``"full"`` (ImageNet-1k/ADE20K commands, configs and Slurm scripts, nothing run); quick:
    smallest demo configs; jobs: demo-scale steps side by side (default :func:`mimbench.steps.default_jobs`).
    """
    _check_paper(paper)
    if scale not in SCALES:
        raise MimbenchError(f"Unknown scale {scale!r}.", f"Use one of: {', '.join(SCALES)}.")
    grid = build_grid(paper, scale, quick=quick)
    if paper == "mae-fig9":
        return run_sweep(grid, "full" if scale == "full" else ("quick" if quick else "demo"), Path(out),
                         _config_depth(grid.base_paths["mae"]), jobs=default_jobs() if jobs is None else jobs)
    if scale == "full":
        root = write_full_grid(grid, Path(out))
        print(f"{sum(p.pretrain for p in grid.points)} grid points of {paper}: configs in {root / 'configs'}, Slurm scripts in "
              f"{root / 'sbatch'}, all commands in {root / 'commands.sh'} (nothing was run).")
        return root
    table = run_demo_grid(grid, Path(out), jobs=default_jobs() if jobs is None else jobs)
    print(table.read_text())
    print(f"table written to {table}")
    return table.parent
