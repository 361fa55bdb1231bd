"""Run records: one JSON file per evaluation run, the unit every table and plot is built from.

A record (``SCHEMA_VERSION`` 1) is a JSON object::

    schema_version  1
    run_id          32 hex digits (uuid4)
    task            linear | finetune | knn | segment | lowshot | attentive | robustness | bench | analyze
    protocol        {name, sha256, deviations: [str, ...]}      config name, its hash, every departure from it
    encoder         {path, sha256, arch, technique, epochs, ...} (None only for task "bench"; encoder_summary
                    adds family, source, layout and dropped)
    dataset         {name, root, sizes: {split: n_images}}
    metrics         {name: value}                                e.g. {"top1": 71.3, "top5": 90.2}
    seed            int
    started/finished ISO-8601 UTC strings;  duration_s  seconds (float)
    hardware        {device: cpu|cuda, count, ..., tf32_enabled, precision}  precision: bf16 | fp16 | none (fp32) as resolved;
                                                                   tf32_enabled: fp32 products ran on TF32
    versions        {python, torch, timm, mmseg, mimbench, git_commit, git_dirty}
    status          ok | failed | interrupted

Records are written atomically as ``<task>-<run_id>.json``; :func:`load_records` reads them back
into a flat pandas table and reports, by file name, every file it had to skip.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from safetensors import safe_open

from mimbench.atomic import atomic_write
from mimbench.config import config_sha256, load_config
from mimbench.encoders import encoder_family, encoder_sha256, is_encoder_file, read_metadata
from mimbench.env import environment_info  # noqa: F401  (re-exported: records carry it)
from mimbench.errors import MimbenchError

SCHEMA_VERSION = 1
TASKS = ("linear", "finetune", "knn", "segment", "lowshot", "attentive", "robustness", "bench", "analyze")
STATUSES = ("ok", "failed", "interrupted")
RECORD_NAME = re.compile(r"^(%s)-[0-9a-f]{32}\.json$" % "|".join(TASKS))

_REQUIRED = {
    "protocol": ("name", "sha256", "deviations"),
    "encoder": ("path", "sha256", "arch", "technique", "epochs"),
    "dataset": ("name", "root", "sizes"),
    "hardware": ("device", "count"),
    "versions": ("python", "torch", "timm", "mmseg", "mimbench", "git_commit"),
}
_TOP = ("schema_version", "run_id", "task", "protocol", "encoder", "dataset", "metrics", "seed", "started",
        "finished", "duration_s", "hardware", "versions", "status")

#: Migrations from older schema versions: version -> function(record) -> record of version+1.
#: Version 1 is the first schema, so there is nothing to migrate yet; any other version is refused.
MIGRATIONS: dict[int, Any] = {}


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def encoder_summary(path, layout: str = "auto") -> dict:
    """The ``encoder`` block of a record: path, sha256 of the file as given, and metadata fields.

    For a checkpoint read in a foreign layout, ``layout`` names it and ``dropped`` lists the tensors
    left out on purpose (per module, as ``mimbench convert`` records them); for encoder files
    ``layout`` is ``mimbench`` (or the layout the file was converted from). The argument ``layout`` is
    the checkpoint's layout as given (``--from``; "auto" detects it).
    """

    meta = read_metadata(path, layout=layout)
    return {"path": str(Path(path)), "sha256": encoder_sha256(path), "arch": meta["arch"],
            "family": encoder_family(meta), "technique": meta["technique"], "epochs": float(meta["epochs"]),
            "source": meta["source"], "layout": meta.get("source_layout", "mimbench"),
            "dropped": meta.get("source_dropped", "")}


def new_record(task: str, *, protocol: dict, encoder: dict | None, dataset: dict, metrics: dict, seed: int,
               started: float, finished: float, status: str = "ok", precision: str | None = None,
               precision_reason: str | None = None) -> dict:
    """Assemble and validate a record. ``started``/``finished`` are POSIX timestamps (``time.time()``).

    ``protocol["deviations"]`` defaults to [] and ``dataset["root"]``/``["sizes"]`` to None/{};
    versions and hardware are filled in from :func:`mimbench.env.environment_info`; ``precision`` (the
    resolved compute precision, :func:`mimbench.fastpath.resolve_amp`) goes into ``hardware``, and
    ``precision_reason`` (why, :func:`mimbench.fastpath.precision_choice`) beside it.
    """
    env = environment_info()
    protocol = {"name": protocol.get("name"), "sha256": protocol.get("sha256"), "deviations": [], **protocol}
    dataset = {"name": dataset.get("name"), "root": None, "sizes": {}, **dataset}
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "task": task,
        "protocol": protocol,
        "encoder": dict(encoder) if encoder is not None else None,
        "dataset": dataset,
        "metrics": dict(metrics),
        "seed": seed,
        "started": _iso(started),
        "finished": _iso(finished),
        "duration_s": round(float(finished) - float(started), 3),
        "hardware": {**env["hardware"], **({"precision": precision} if precision else {}),
                     **({"precision_reason": precision_reason} if precision_reason else {})},
        "versions": env["versions"],
        "status": status,
    }
    validate_record(record)
    return record


def _nonfinite(value: Any, where: str) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where} is {value} (JSON has no NaN/inf; store None and set status='failed')"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nonfinite(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _nonfinite(v, f"{where}[{i}]")]
    return []


def record_problems(record: Any) -> list[str]:
    """Everything wrong with a (schema version 1) record; empty when it is valid."""
    if not isinstance(record, dict):
        return [f"a record is a JSON object, got {type(record).__name__}"]
    problems = [f"missing field {k!r}" for k in _TOP if k not in record]
    if problems:
        return problems
    if record["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {record['schema_version']!r} (expected {SCHEMA_VERSION})")
    if not (isinstance(record["run_id"], str) and re.fullmatch(r"[0-9a-f]{32}", record["run_id"])):
        problems.append(f"run_id {record['run_id']!r} is not 32 hex digits")
    if record["task"] not in TASKS:
        problems.append(f"task {record['task']!r} not one of {', '.join(TASKS)}")
    if record["status"] not in STATUSES:
        problems.append(f"status {record['status']!r} not one of {', '.join(STATUSES)}")
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        problems.append(f"seed {record['seed']!r} is not an integer")
    if not isinstance(record["metrics"], dict):
        problems.append("metrics is not an object")
    if not isinstance(record["duration_s"], (int, float)):
        problems.append("duration_s is not a number")
    for key in ("started", "finished"):
        try:
            _dt.datetime.fromisoformat(str(record[key]).replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"{key} {record[key]!r} is not an ISO-8601 time")
    for block, fields in _REQUIRED.items():
        value = record[block]
        if block == "encoder" and value is None and record["task"] == "bench":
            continue
        if not isinstance(value, dict):
            problems.append(f"{block} is not an object")
            continue
        problems += [f"missing field '{block}.{f}'" for f in fields if f not in value]
    if isinstance(record["protocol"], dict) and not isinstance(record["protocol"].get("deviations", []), list):
        problems.append("protocol.deviations is not a list")
    if isinstance(record["dataset"], dict):
        if not isinstance(record["dataset"].get("sizes", {}), dict):
            problems.append("dataset.sizes is not an object")
        if not isinstance(record["dataset"].get("name", ""), str):
            problems.append("dataset.name is not a string")
    if isinstance(record["protocol"], dict) and not isinstance(record["protocol"].get("name", ""), str):
        problems.append("protocol.name is not a string")
    return problems + _nonfinite(record, "record")


def validate_record(record: Any) -> None:
    """Raise MimbenchError listing every problem of the record."""
    problems = record_problems(record)
    if problems:
        raise MimbenchError("Invalid run record: " + "; ".join(problems) + ".",
                            "Build records with mimbench.results.records.new_record.")


def write_record(results_dir, record: dict) -> Path:
    """Write ``record`` to ``results_dir/<task>-<run_id>.json`` atomically; return the path.

    The JSON goes to a temporary file in the same folder, is fsync'ed, then renamed over the
    target, so a reader never sees a partial record and an existing record is only ever
    replaced by a complete one. Unwritable or non-directory ``results_dir`` -> MimbenchError.
    """
    validate_record(record)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    results_dir = Path(results_dir)
    target = results_dir / f"{record['task']}-{record['run_id']}.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what="the run record",
                 fix="Give an output folder that is a directory you can write to (and has free space).")
    return target


def _migrate(record: dict) -> tuple[dict | None, str | None]:
    version = record.get("schema_version")
    if version == SCHEMA_VERSION:
        return record, None
    if not isinstance(version, int):
        return None, f"no valid schema_version ({version!r})"
    if version > SCHEMA_VERSION:
        return None, (f"schema_version {version} was written by a newer mimbench (this one reads {SCHEMA_VERSION}); "
                      "upgrade mimbench to read it")
    while version in MIGRATIONS:
        record = MIGRATIONS[version](record)
        version = record["schema_version"]
    if version != SCHEMA_VERSION:
        return None, f"schema_version {version} has no migration to {SCHEMA_VERSION}; re-run the evaluation"
    return record, None


def _candidates(paths: Iterable) -> tuple[list[Path], list[str]]:
    files, problems = [], []
    for p in paths:
        p = Path(p)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*.json") if RECORD_NAME.match(f.name))
            if not found:
                problems.append(f"{p}: no run records (<task>-<run_id>.json) found")
            files += found
        else:
            raise MimbenchError(f"{p} does not exist.", "Give directories (searched recursively) or record files.")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


#: Columns every table has, even an empty one, so that callers can select them safely.
BASE_COLUMNS = ["file", "run_id", "task", "status", "seed", "started", "duration_s", "protocol.name",
                "encoder.path", "encoder.arch", "encoder.technique", "encoder.epochs", "dataset.name"]


def load_records(*dirs) -> tuple["pandas.DataFrame", list[str]]:  # noqa: F821
    """Read run records from directories (recursively, files named ``<task>-<run_id>.json``) or files.

    Returns ``(table, problems)``: one row per valid record with nested fields flattened to
    dotted columns (``metrics.top1``, ``encoder.technique``, ``dataset.sizes.train`` ...) plus
    ``file``; ``problems`` names each skipped file and why (unreadable, not JSON, missing
    fields, other schema version, duplicate run_id). Skipped files are never counted.
    """

    files, problems = _candidates(dirs)
    rows, run_ids = [], {}
    for f in files:
        try:
            record = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{f}: unreadable ({e}); skipped")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{f}: not valid JSON ({e.msg} at line {e.lineno}); skipped (partial or corrupt file)")
            continue
        if not isinstance(record, dict):
            problems.append(f"{f}: not a run record (JSON {type(record).__name__}); skipped")
            continue
        record, why = _migrate(record)
        if why:
            problems.append(f"{f}: {why}; skipped")
            continue
        bad = record_problems(record)
        if bad:
            problems.append(f"{f}: {'; '.join(bad)}; skipped")
            continue
        if record["run_id"] in run_ids:
            first = run_ids[record["run_id"]]
            problems.append(f"{f}: duplicate of run {record['run_id']} already read from {first}; skipped")
            continue
        run_ids[record["run_id"]] = f
        rows.append({"file": str(f), **record})
    if not rows:
        return pd.DataFrame(columns=BASE_COLUMNS), problems
    table = pd.json_normalize(rows, sep=".")
    for col in BASE_COLUMNS:
        if col not in table.columns:
            table[col] = None
    table = table.sort_values(["started", "file"], kind="stable").reset_index(drop=True)
    return table, problems


def finished_record(step_dir: Path, config: Path | None = None, overrides=(),
                    encoder: Path | None = None) -> dict | None:
    """A finished (status ok) record in ``step_dir``; with ``config``/``encoder``, only one made from them.

    A record whose resolved config (``config`` with ``overrides``) or encoder hash differs -- one left by
    another demo size, an older config or a re-trained encoder -- is not returned, so it is never reused
    as if it were the step asked for.
    """
    want_sha = enc_sha = None
    if config is not None:
        # allow_new_keys: an override may set a key the schema knows but the file leaves at its default (the run
        # validated it against its kind's schema), which then counts in the hash as the run's did
        want_sha = config_sha256(load_config(config, list(overrides), allow_new_keys=True))
    if encoder is not None:
        enc_sha = encoder_sha256(encoder)
    for path in sorted(step_dir.glob("*.json")) if step_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        finished = isinstance(record, dict) and record.get("status") == "ok"
        if not (finished and isinstance(record.get("metrics"), dict)):
            continue
        if want_sha is not None and (record.get("protocol") or {}).get("sha256") != want_sha:
            continue
        if enc_sha is not None and (record.get("encoder") or {}).get("sha256") != enc_sha:
            continue
        return record
    return None


def encoder_made_by(enc: Path, config: Path, overrides) -> bool:
    """A file already exported by this pre-training config with these overrides: an encoder file, or another
    safetensors file a model exports itself (a BEiT v2 tokenizer); both carry the resolved config's hash."""
    if not enc.is_file():
        return False

    if is_encoder_file(enc):
        meta = read_metadata(enc)
    else:
        with safe_open(str(enc), framework="pt") as f:
            meta = f.metadata() or {}
    return meta.get("config_sha256") == config_sha256(load_config(config, list(overrides)))
