"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through mmengine's own vis backends.

A run's ``runtime.trackers`` (``--tracker``, repeatable) names them; each receives the scalars of the jsonl log
(:mod:`mimbench.engine`, or mmengine's logger hook in segmentation) and, through :func:`log_record`, the
final record's numeric metrics. Everything works with no network:

* ``tensorboard`` - event files under ``<out>/tensorboard``.
* ``wandb`` - an offline run under ``<out>/wandb`` (``wandb sync <out>/wandb/offline-run-*`` uploads it later);
  ``WANDB_MODE=online`` streams instead, ``WANDB_PROJECT`` names the project (default ``mimbench``).
* ``mlflow`` - a file store ``file:<out>/mlruns`` (``mlflow ui --backend-store-uri <out>/mlruns``), experiment
  ``mimbench`` (or ``MLFLOW_EXPERIMENT_NAME``); ``MLFLOW_TRACKING_URI`` points at a server instead.

The tracker run of an output directory has a stable id (from the directory's absolute path), so a resumed run
and its final record continue the same W&B / MLflow run. The packages are the optional extra
``mimbench[trackers]``; a missing one is refused by :func:`require` before any work starts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from mimbench.errors import MimbenchError
from mimbench.schema import TRACKERS

__all__ = ["TRACKERS", "EXTRA", "require", "selected", "run_key", "vis_backend_cfgs", "vis_backends",
           "add_to_runner_config", "record_scalars", "log_record"]

EXTRA = "pip install 'mimbench[trackers]'"
#: The package each tracker imports.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: mmengine's backend of each tracker (mmengine.visualization, registry VISBACKENDS).
BACKENDS = {"tensorboard": "TensorboardVisBackend", "wandb": "WandbVisBackend", "mlflow": "MLflowVisBackend"}
#: W&B settings for a run nobody watches live: no console capture, no system-metrics thread, no git or code upload.
WANDB_SETTINGS = {"silent": True, "console": "off", "disable_git": True, "disable_code": True,
                  "x_disable_stats": True}
RUN_TAG = "mimbench.run"  # MLflow tag holding run_key(out_dir)


def require(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` without repeats, in order, once every tracker is known and its package importable;
    MimbenchError naming the extra otherwise."""
    names = tuple(dict.fromkeys(names))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise MimbenchError(f"Unknown tracker(s) {', '.join(map(repr, unknown))}.",
                            f"Use any of: {', '.join(TRACKERS)}.")
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise MimbenchError(f"The {name} tracker needs the {PACKAGES[name]} package, which is not installed.",
                                f"{EXTRA} (every tracker), or pip install {PACKAGES[name]}; "
                                f"or leave {name} out of runtime.trackers / --tracker.")
    return names


def selected(runtime: Mapping | None) -> tuple[str, ...]:
    """The trackers a config's ``runtime`` section names (``tensorboard=True`` adds ``tensorboard``), checked
    by :func:`require`. An mmsegmentation config may have no runtime section: then none."""
    runtime = runtime or {}
    names = list(runtime["trackers"] if "trackers" in runtime else ())
    if "tensorboard" in runtime and runtime["tensorboard"]:
        names.append("tensorboard")
    return require(names)


def run_key(out_dir) -> str:
    """The stable tracker-run id of an output directory (W&B run id, MLflow tag ``mimbench.run``)."""
    return hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]


def _mlflow_uri(out_dir: Path) -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI``, else the file store ``<out>/mlruns`` (as mmengine writes it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file://{os.path.abspath(out_dir / 'mlruns')}"
    if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _backend_cfg(name: str, out_dir: Path, run_name: str, config: Mapping | None) -> dict:
    if name == "tensorboard":
        return dict(type=BACKENDS[name], save_dir=str(out_dir / "tensorboard"))
    if name == "wandb":
        init = dict(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out_dir),
                    project=os.environ.get("WANDB_PROJECT", "mimbench"), name=run_name, id=run_key(out_dir),
                    resume="allow", settings=dict(WANDB_SETTINGS))
        if config is not None:
            init["config"] = dict(config)
        return dict(type=BACKENDS[name], save_dir=str(out_dir / "wandb"), init_kwargs=init)
    _mlflow_uri(out_dir)  # opts in to the file store; tracking_uri None: mmengine's file:<save_dir>
    return dict(type=BACKENDS[name], save_dir=str(out_dir / "mlruns"),
                tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                exp_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimbench"), run_name=run_name,
                tags={RUN_TAG: run_key(out_dir)}, artifact_suffix=())  # the run's files stay in out_dir


def vis_backend_cfgs(names: Iterable[str], out_dir, run_name: str | None = None,
                     config: Mapping | None = None) -> list[dict]:
    """mmengine config dicts of the backends of ``names`` writing under ``out_dir`` (for a runner config's
    ``visualizer.vis_backends``); ``run_name`` defaults to the directory's name, ``config`` goes to W&B."""
    out_dir = Path(out_dir)
    return [_backend_cfg(n, out_dir, run_name or out_dir.name, config) for n in require(names)]


def _continue_mlflow_run(uri: str, exp_name: str, key: str) -> bool:
    """Make the newest MLflow run tagged ``key`` the active run, so that the backend logs into it; False when
    there is none (the backend then starts one)."""
    import mlflow  # optional (mimbench[trackers]) and heavy

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(exp_name)
    if exp is None:
        return False
    if mlflow.active_run() is not None:
        return mlflow.active_run().data.tags.get(RUN_TAG) == key
    runs = mlflow.tracking.MlflowClient(uri).search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'", order_by=["attributes.start_time DESC"],
        max_results=1)
    if runs:
        mlflow.start_run(run_id=runs[0].info.run_id)
    return bool(runs)


def _console_streams_open() -> None:
    """mmengine's MLflow backend reopens every closed stream of its logger as a file, which a console handler
    has none of (its stream closes when, e.g., a test runner's captured stdout goes): point those at stdout."""
    from mmengine.logging import MMLogger  # mmengine's logging stack: only when tracking

    for handler in MMLogger.get_current_instance().handlers:
        if not isinstance(handler, logging.FileHandler) and getattr(handler, "stream", None) is not None \
                and handler.stream.closed:
            handler.stream = sys.stdout


def _flat(config: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def vis_backends(names: Iterable[str], out_dir, run_name: str | None = None,
                 config: Mapping | None = None) -> list:
    """The mmengine backends of ``names`` (see :func:`vis_backend_cfgs`), ready for ``add_scalars(scalars,
    step=...)`` and ``close()``. An earlier W&B / MLflow run of ``out_dir`` is continued; a new MLflow run gets
    ``config`` as its parameters (a continued one keeps its own: MLflow parameters cannot change)."""
    from mmengine.config import Config  # mmengine's visualization stack (matplotlib, cv2): only when tracking
    from mmengine.visualization.vis_backend import VISBACKENDS

    backends = []
    for cfg in vis_backend_cfgs(names, out_dir, run_name, config):
        is_mlflow = cfg["type"] == BACKENDS["mlflow"]
        if is_mlflow:
            _console_streams_open()
        if is_mlflow and not _continue_mlflow_run(_mlflow_uri(Path(out_dir)), cfg["exp_name"], cfg["tags"][RUN_TAG]):
            cfg["params"] = _flat(config or {})
        backend = VISBACKENDS.build(cfg)
        if is_mlflow:  # close() reads the work_dir that add_config() keeps (and uploads no files: no artifact_suffix);
            backend.cfg = Config({"work_dir": str(out_dir)})  # add_config() itself would log it as a parameter,
            # which a continued run (a segmentation run's, whose work_dir is <out>/mmseg) may hold with another value
        backends.append(backend)
    return backends


def add_to_runner_config(cfg, names: Iterable[str], out_dir, run_name: str | None = None) -> None:
    """Add the backends of ``names`` to an mmengine runner config's ``visualizer`` (segmentation); a config
    without one gets the visualizer mmengine's Runner would build (local files) plus these."""
    extra = vis_backend_cfgs(names, out_dir, run_name)
    if not extra:
        return
    if "visualizer" not in cfg or cfg.visualizer is None:
        cfg.visualizer = dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")])
    cfg.visualizer.vis_backends = list(cfg.visualizer.vis_backends if "vis_backends" in cfg.visualizer else []) + extra


def record_scalars(record: Mapping) -> dict[str, float]:
    """The record's finite numeric metrics as ``final/<name>`` (a nested table: ``final/<name>/<key>``)."""
    out: dict[str, float] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}/{key}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{prefix}/{key}"] = float(value)

    walk(record["metrics"], "final")
    return out


def log_record(names: Iterable[str], out_dir, record: Mapping, *, run_name: str | None = None,
               step: int = 0) -> None:
    """Log the record's numeric metrics (:func:`record_scalars`) to the trackers' runs of ``out_dir``."""
    names = require(names)
    if not names:
        return
    for backend in vis_backends(names, out_dir, run_name):
        try:
            backend.add_scalars(record_scalars(record), step=step)
        finally:
            backend.close()
