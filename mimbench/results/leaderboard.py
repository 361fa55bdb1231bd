"""Published results (``mimbench/results/leaderboard.csv``) and where a user's own runs land among them.

The table has one row per (method, arch, pretrain_epochs, task, metric, protocol)::

    method           e.g. "MAE", "MAE (mmpretrain)" (a re-run by another code base is its own method)
    arch             vit-b/16 | vit-l/16 | vit-h/14 | ... (the encoder files' ``arch`` spelling)
    pretrain_epochs  ImageNet-1k pre-training epochs; empty where the source does not state them
    task             finetune | linear | knn | ade20k | attentive | lowshot | robustness
    metric           top1 (classification, %) | mIoU (ADE20K, %) | mce (robustness on ImageNet-C: mean corruption
                     error in %, lower is better)
    value            0-100
    protocol         one of :data:`STANDARD_PROTOCOLS` (attentive: of :data:`ATTENTIVE_PROTOCOLS`, one per head
                     preset; lowshot: of :data:`LOWSHOT_PROTOCOLS`, one per training subset) or a named variant
                     (e.g. multi-scale testing; partial fine-tuning: :func:`partial_ft_protocol`; robustness: the
                     set's name as ``eval robustness --sets`` writes it, "in-c", "in-a", "in-r", "sketch", with
                     " @448" for a model fine-tuned at 448)
    notes            protocol details (linear head, hybrid backbone, ...)
    source           paper + table or repository file the number comes from
    verified         yes (the number was found in that source) | unverified (taken from a secondary
                     summary and not confirmed against the source; kept, never guessed or dropped)

The CSV exists once, inside the package (``mimbench/results/leaderboard.csv``, read through
``importlib.resources``), so that an installed mimbench reads it without a checkout and no second copy
can drift from it; the repository's top-level ``results/`` is for what users write.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Iterable

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mimbench.errors import MimbenchError
from mimbench.results.records import load_records

COLUMNS = ["method", "arch", "pretrain_epochs", "task", "metric", "value", "protocol", "notes", "source", "verified"]
KEY = ["method", "arch", "pretrain_epochs", "task", "metric", "protocol"]
TASK_METRIC = {"finetune": "top1", "linear": "top1", "knn": "top1", "ade20k": "mIoU", "attentive": "top1",
               "lowshot": "top1", "robustness": "top1"}
#: Metrics a task has besides its :data:`TASK_METRIC` (robustness: ImageNet-C mCE beside top-1 on the other sets).
OTHER_METRICS = {"robustness": ("mce",)}
#: Metrics where a lower value ranks first.
LOWER_IS_BETTER = ("mce",)
#: The protocol each mimbench evaluation reproduces; only rows under it are used to rank a run.
STANDARD_PROTOCOLS = {
    "finetune": "IN-1k fine-tune 224",
    "linear": "IN-1k linear probe 224",
    "knn": "IN-1k k-NN",
    "ade20k": "ADE20K UperNet 160k single-scale",
}
#: Attentive probing has one protocol per head preset (the record's ``protocol.head_preset``): the heads differ
#: in size and recipe, so a run is ranked only among rows of its own preset.
ATTENTIVE_PROTOCOLS = {
    "cae": "IN-1k attentive probe 224 (CAE head)",
    "ep": "IN-1k attentive probe 224 (EP head; 32 queries)",
    "vjepa": "IN-1k attentive probe 224 (V-JEPA head)",
}
#: Low-shot rows, one protocol per training subset (images per class, or a share of the labels). The published rows
#: do not say which classifier gives each number, and the protocol says so; an own low-shot run is listed by
#: ``mimbench report``, not ranked here (its record task is not in :data:`RECORD_TASK`).
LOWSHOT_PROTOCOLS = {
    "1-shot": "IN-1k low-shot 1 image/class (classifier not stated)",
    "2-shot": "IN-1k low-shot 2 images/class (classifier not stated)",
    "5-shot": "IN-1k low-shot 5 images/class (classifier not stated)",
    "1%": "IN-1k low-shot 1 % labels (classifier not stated)",
    "10%": "IN-1k low-shot 10 % labels (classifier not stated)",
}
#: Run-record task -> leaderboard task.
RECORD_TASK = {"linear": "linear", "finetune": "finetune", "knn": "knn", "segment": "ade20k", "attentive": "attentive"}


def standard_protocol(task: str, preset: str = "") -> str | None:
    """The protocol a run of leaderboard ``task`` is ranked under (attentive: that of its head ``preset``); None
    when there is none (an attentive run without a known preset; low-shot and robustness, whose protocols are
    one per subset or set)."""
    return ATTENTIVE_PROTOCOLS.get(preset) if task == "attentive" else STANDARD_PROTOCOLS.get(task)
VERIFIED = ("yes", "unverified")


def partial_ft_protocol(trainable_blocks: int | str) -> str:
    """The leaderboard protocol of a partial fine-tune (MAE Figure 9) with ``finetune.trainable_blocks`` =
    ``trainable_blocks``: "partial-ft (0 blocks)", "partial-ft (last MLP)", "partial-ft (1 block)", "partial-ft
    (4 blocks)", "partial-ft (all blocks)"."""
    if trainable_blocks == "mlp":
        return "partial-ft (last MLP)"
    if trainable_blocks == "all":
        return "partial-ft (all blocks)"
    return f"partial-ft ({trainable_blocks} block{'' if trainable_blocks == 1 else 's'})"

_TIMM_SIZES = {"tiny": "t", "small": "s", "base": "b", "large": "l", "huge": "h", "giant": "g"}


def normalize_arch(arch: str) -> str:
    """Spell an architecture the leaderboard way: ``vit_base_patch16_224`` / ``ViT-B/16`` -> ``vit-b/16``."""
    text = str(arch).strip().lower()
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)(?:_\w+)?(?:\.\w+)?", text)
    if m:
        return f"vit-{_TIMM_SIZES[m.group(1)]}/{m.group(2)}"
    m = re.fullmatch(r"vit[-_ ]?(t|s|b|l|h|g)\s*/\s*(\d+)", text)
    if m:
        return f"vit-{m.group(1)}/{m.group(2)}"
    return text


def packaged_csv() -> Path:
    """Path of the leaderboard CSV shipped with the package."""
    return Path(str(resources.files("mimbench.results").joinpath("leaderboard.csv")))


def load_leaderboard(path: str | Path | None = None) -> "pandas.DataFrame":  # noqa: F821
    """Read and validate the published leaderboard (the packaged copy unless ``path`` is given).

    ``pretrain_epochs`` is a nullable integer column (``<NA>`` where the source gives none).
    """

    path = Path(path) if path is not None else packaged_csv()
    if not path.is_file():
        raise MimbenchError(f"The leaderboard file {path} does not exist (this installation lacks its package data).",
                            "Reinstall mimbench from a wheel or checkout that ships mimbench/results/leaderboard.csv, "
                            "or pass the path of a leaderboard CSV.")
    try:
        df = pd.read_csv(path, dtype={"pretrain_epochs": "Int64", "value": float}, keep_default_na=False,
                         na_values={"pretrain_epochs": [""]})
    except (ValueError, pd.errors.ParserError) as e:
        raise MimbenchError(f"Cannot parse the leaderboard {path}: {e}.",
                            f"Columns are {', '.join(COLUMNS)}; pretrain_epochs an integer or empty.") from e
    validate_leaderboard(df)
    return df


def leaderboard_problems(df) -> list[str]:
    """Everything wrong with a leaderboard table; empty when it is valid."""

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        return [f"missing column(s) {', '.join(missing)}"]
    problems = []
    for i, row in df.iterrows():
        where = f"row {i + 2} ({row['method']} {row['arch']} {row['task']})"  # +2: header line, 1-based
        if row["task"] not in TASK_METRIC:
            problems.append(f"{where}: task {row['task']!r} not one of {', '.join(TASK_METRIC)}")
        elif row["metric"] != TASK_METRIC[row["task"]] and row["metric"] not in OTHER_METRICS.get(row["task"], ()):
            problems.append(f"{where}: metric {row['metric']!r} for task {row['task']} "
                            f"(expected {TASK_METRIC[row['task']]})")
        value = pd.to_numeric(row["value"], errors="coerce")
        if pd.isna(value) or not 0 <= value <= 100:
            problems.append(f"{where}: value {row['value']!r} is not a number in 0-100")
        if not str(row["source"]).strip():
            problems.append(f"{where}: no source")
        if row["verified"] not in VERIFIED:
            problems.append(f"{where}: verified {row['verified']!r} not one of {', '.join(VERIFIED)}")
        for col in ("method", "arch", "protocol"):
            if not str(row[col]).strip():
                problems.append(f"{where}: empty {col}")
        epochs = row["pretrain_epochs"]
        if not pd.isna(epochs) and (float(epochs) <= 0 or float(epochs) != int(float(epochs))):
            problems.append(f"{where}: pretrain_epochs {epochs!r} is not a positive integer")
    keys = df[KEY].astype(str)
    for key, group in keys.groupby(KEY, sort=False):
        if len(group) > 1:
            rows = ", ".join(str(i + 2) for i in group.index)
            problems.append(f"duplicate key {dict(zip(KEY, key))} in rows {rows}")
    return problems


def validate_leaderboard(df) -> None:
    """Raise MimbenchError listing every problem (duplicate keys, values outside 0-100, missing sources,
    unknown tasks/metrics)."""
    problems = leaderboard_problems(df)
    if problems:
        raise MimbenchError("Invalid leaderboard: " + "; ".join(problems) + ".",
                            "Fix those rows of mimbench/results/leaderboard.csv.")


# --------------------------------------------------------------------------------------------------
# The user's own runs


def field_text(value) -> str:
    """A record field as text; missing (None/NaN) -> ''."""

    return "" if value is None or (not isinstance(value, (list, dict)) and pd.isna(value)) else str(value)


def record_metric(row, task: str) -> float | None:
    """The headline metric of a flattened record row: top-1 (%) for classification, mIoU (%) for ADE20K/segment."""

    task = RECORD_TASK.get(task, task)
    names = ("mIoU", "miou", "mIoU_ss") if task == "ade20k" else ("top1", "acc1", "top1_acc")
    for name in names:
        col = f"metrics.{name}"
        if col in row.index and not pd.isna(row[col]):
            return float(row[col])
    return None


#: Last parts of override keys that change where or how verbosely a run works, never its numbers.
NEUTRAL_OVERRIDES = frozenset({"num_workers", "persistent_workers", "cache_dir", "progress", "log_every", "ckpt_every",
                               "log_level", "interval", "save_last", "max_keep_ckpts"})


def run_deviations(row) -> list[str]:
    """Why a run does not follow the published protocol: its recorded deviations, its ``--set`` overrides of
    anything but the bookkeeping keys in NEUTRAL_OVERRIDES, built-in demo data."""
    devs = row.get("protocol.deviations")
    out = [str(d) for d in devs] if isinstance(devs, (list, tuple)) else []
    overrides = row.get("protocol.overrides")
    for item in overrides if isinstance(overrides, (list, tuple)) else []:
        key = str(item).split("=", 1)[0].strip()
        if key.rsplit(".", 1)[-1] not in NEUTRAL_OVERRIDES:
            out.append(f"override {item}")
    name = field_text(row.get("dataset.name"))
    if name.startswith("builtin:") or "fashion" in name.lower():
        out.append(f"demo scale (dataset {name})")
    if "demo" in field_text(row.get("protocol.name")).lower() and not any("demo" in d for d in out):
        out.append(f"demo protocol ({row.get('protocol.name')})")
    return out


def own_runs(include_runs) -> tuple["pandas.DataFrame", list[str]]:  # noqa: F821
    """The user's runs as leaderboard rows (plus ``own``, ``deviations``, ``file``); problems from loading."""


    dirs = include_runs if isinstance(include_runs, (list, tuple)) else [include_runs]
    table, problems = load_records(*dirs)
    rows = []
    for _, r in table.iterrows():
        task = RECORD_TASK.get(r["task"])
        if task is None:
            continue
        if r["status"] != "ok":
            problems.append(f"{r['file']}: status {r['status']}; not ranked")
            continue
        value = record_metric(r, task)
        if value is None:
            problems.append(f"{r['file']}: no {TASK_METRIC[task]} metric; not ranked")
            continue
        epochs = pd.to_numeric(r.get("encoder.epochs"), errors="coerce")
        technique = field_text(r.get("encoder.technique")) or Path(field_text(r.get("encoder.path"))).stem
        rows.append({
            "method": f"{technique} (own)", "arch": normalize_arch(field_text(r.get("encoder.arch"))),
            "pretrain_epochs": int(epochs) if not pd.isna(epochs) and epochs > 0 else pd.NA,
            "task": task, "metric": TASK_METRIC[task], "value": value,
            "protocol": str(r.get("protocol.name") or ""), "notes": "", "source": str(r["file"]),
            "verified": "own run", "own": True, "deviations": run_deviations(r), "file": str(r["file"]),
            "preset": field_text(r.get("protocol.head_preset")),
        })
    cols = COLUMNS + ["own", "deviations", "file", "preset"]
    return pd.DataFrame(rows, columns=cols), problems


def ranked(task: str | None = None, arch: str | None = None, include_runs=None):
    """Published rows (and own runs) filtered by task/arch, best first within each (task, arch).

    Returns ``(table, problems)``; the table has the leaderboard columns plus ``own`` (bool) and
    ``deviations`` (list of str; empty for published rows).
    """

    if task is not None and task not in TASK_METRIC:
        raise MimbenchError(f"Unknown task {task!r}.", f"Use one of {', '.join(TASK_METRIC)}.")
    df = load_leaderboard().assign(own=False, file="")
    df["deviations"] = [[] for _ in range(len(df))]
    problems: list[str] = []
    if include_runs is not None:
        mine, problems = own_runs(include_runs)
        if len(mine):
            df = pd.concat([df, mine], ignore_index=True)
    if task is not None:
        df = df[df["task"] == task]
    if arch is not None:
        known = sorted(set(df["arch"]))
        df = df[df["arch"] == normalize_arch(arch)]
        if df.empty:
            what = f"{task} results" if task else "results"
            raise MimbenchError(f"No {what} for architecture {arch!r} ({normalize_arch(arch)}).",
                                f"Architectures with {what}: {', '.join(known)}.")
    order = df["value"].where(~df["metric"].isin(LOWER_IS_BETTER), -df["value"])  # best first, mCE lowest first
    df = df.assign(_order=order).sort_values(["task", "arch", "_order"], ascending=[True, True, False], kind="stable")
    return df.drop(columns="_order").reset_index(drop=True), problems


def show_leaderboard(task: str | None = None, arch: str | None = None, include_runs=None, console=None):
    """Print the ranked leaderboard as a rich table (own runs marked ``*``, deviations named); return it."""

    df, problems = ranked(task, arch, include_runs)
    console = console or Console()
    title = "Published results" + (f" — {task}" if task else "") + (f" — {normalize_arch(arch)}" if arch else "")
    table = Table(title=title, show_lines=False)
    # Columns fixed by the filter are in the title, not repeated on every row.
    cols = [c for c in ("#", "method", "arch", "ep", "task", "value", "protocol", "source", "verified")
            if not (c == "task" and task) and not (c == "arch" and arch)]
    for col in cols:
        table.add_column(col, justify="right" if col in ("#", "ep", "value") else "left",
                         overflow="fold", no_wrap=col in ("#", "arch", "ep", "task", "value", "verified"))
    rank, group = 0, None
    for _, r in df.iterrows():
        if (r["task"], r["arch"]) != group:
            group, rank = (r["task"], r["arch"]), 0
        rank += 1
        epochs = "" if r["pretrain_epochs"] is None or str(r["pretrain_epochs"]) in ("<NA>", "nan") \
            else str(r["pretrain_epochs"])
        protocol = r["protocol"]
        if r["own"] and r["deviations"]:
            protocol += " [deviates: " + "; ".join(r["deviations"]) + "]"
        cells = {"#": str(rank), "method": ("* " if r["own"] else "") + r["method"], "arch": r["arch"],
                 "ep": epochs, "task": r["task"], "value": f"{r['value']:.2f}", "protocol": protocol,
                 "source": r["source"], "verified": r["verified"]}
        # Cells are data, not rich markup ("[deviates: ...]" would otherwise vanish as a tag).
        table.add_row(*(escape(cells[c]) for c in cols), style="bold cyan" if r["own"] else None)
    console.print(table)
    if include_runs is not None:
        console.print("* = your run; runs marked 'deviates' do not follow the published protocol "
                      "and are not comparable to the rows around them.")
    for p in problems:
        console.print(escape(f"skipped: {p}"))
    return df


# --------------------------------------------------------------------------------------------------
# compare


def _comparable_rows(board, arch: str, task: str, protocol: str | None):
    rows = board[(board["arch"] == arch) & (board["task"] == task) & (board["protocol"] == protocol)]
    return rows.sort_values("value", ascending=False, kind="stable").reset_index(drop=True)


def compare_runs(paths: Iterable, console=None) -> list[dict]:
    """Place each run among published results of the same architecture, task and protocol (attentive: the
    protocol of the run's head preset, :data:`ATTENTIVE_PROTOCOLS`).

    Returns one dict per run: ``file, method, arch, task, protocol, value, rank`` (1-based among the published
    rows plus this run), ``of`` (that count), ``above``/``below`` (nearest published rows, dicts with
    method, pretrain_epochs, value, source, delta = run − row, or None). Raises MimbenchError for a
    run that cannot be ranked: deviations from the protocol, demo data, an architecture or task with
    no published rows under the standard protocol. Prints a short summary.
    """


    paths = list(paths)
    if not paths:
        raise MimbenchError("No run records given.", "Pass record files or directories: mimbench compare runs/lin")
    mine, problems = own_runs(paths)
    if mine.empty:
        raise MimbenchError("No rankable run records found: " + ("; ".join(problems) or "none given") + ".",
                            "Give record files (<task>-<run_id>.json) of finished linear/finetune/knn/segment/"
                            "attentive runs.")
    board = load_leaderboard()
    results = []
    for _, run in mine.iterrows():
        where = Path(run["file"]).name
        if run["deviations"]:
            raise MimbenchError(
                f"{where} cannot be ranked against published results: it does not follow the published "
                f"{run['task']} protocol ({'; '.join(run['deviations'])}).",
                "Only runs of the full protocol on the real dataset are comparable; re-run without "
                "overrides on ImageNet-1k / ADE20K, or read the number on its own.")
        protocol = standard_protocol(run["task"], run["preset"])
        rows = _comparable_rows(board, run["arch"], run["task"], protocol)
        if rows.empty:
            archs = sorted(set(board.loc[(board["task"] == run["task"]) & (board["protocol"] == protocol), "arch"]))
            raise MimbenchError(
                f"{where} is a {run['arch']} {run['task']} result; the leaderboard has no {run['task']} rows "
                f"for {run['arch']} under '{protocol}', and results of a different "
                "architecture or protocol are not comparable.",
                f"Published {run['task']} architectures under '{protocol}': {', '.join(archs) or 'none'}.")
        value = float(run["value"])
        better = rows[rows["value"] > value]
        worse = rows[rows["value"] <= value]

        def _row(r):
            if r is None:
                return None
            ep = r["pretrain_epochs"]
            return {"method": r["method"], "pretrain_epochs": None if pd.isna(ep) else int(ep),
                    "value": float(r["value"]), "source": r["source"], "verified": r["verified"],
                    "delta": round(value - float(r["value"]), 4)}

        result = {"file": run["file"], "method": run["method"], "arch": run["arch"], "task": run["task"],
                  "protocol": protocol, "value": value, "rank": len(better) + 1, "of": len(rows) + 1,
                  "above": _row(better.iloc[-1]) if len(better) else None,
                  "below": _row(worse.iloc[0]) if len(worse) else None}
        results.append(result)
    console = console or Console()
    for r in results:
        console.print(escape(f"{Path(r['file']).name}: {r['arch']} {r['task']} {r['value']:.2f} ranks {r['rank']} "
                             f"of {r['of']} under '{r['protocol']}'"))
        for side in ("above", "below"):
            n = r[side]
            if n is not None:
                ep = f" {n['pretrain_epochs']} ep" if n["pretrain_epochs"] else ""
                console.print(escape(f"  {side}: {n['method']}{ep} {n['value']:.2f} (delta {n['delta']:+.2f}; "
                                     f"{n['verified']}; {n['source']})"))
    return results
