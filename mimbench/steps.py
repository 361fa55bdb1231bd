"""Pipelines as lists of steps -- pre-train, build the random control, evaluate -- run by one runner.

``mimbench demo`` and ``mimbench reproduce --scale demo`` are both a list of :class:`Pretrain`,
:class:`Control` and :class:`Evaluate` steps handed to :class:`StepRunner`. Under the runner's root::

    encoders/<name>/encoder.safetensors    the pre-training folder (config.py, log.jsonl, checkpoints) or the control
                                           (a VQ-KD pre-training exports tokenizer.safetensors instead)
    evals/<name>/<task>/                   the evaluation's run record (and its logs)

A step's overrides may name a file an earlier step wrote as ``{runs}/<name>/<file>``; the runner reads
``{runs}`` as its ``encoders/`` folder (:func:`expand_runs`).

The reuse rule, the same for every step: a step is reused only when its result is already there and was
made from the same config, the same ``--set`` overrides and, for an evaluation, the same encoder file:

- pre-training: the exported file's ``config_sha256`` equals the hash of the resolved config (an interrupted
  pre-training whose folder holds ``checkpoint-latest.pt`` and the same resolved ``config.py`` is resumed);
- control: the control file's recipe hash (:func:`mimbench.control.control_sha256`) matches;
- evaluation: a finished record (status ok) whose ``protocol.sha256`` is the resolved config's hash and whose
  ``encoder.sha256`` is the encoder file's (so a re-trained encoder is evaluated again).

Otherwise whatever is in the step's folder (another size's result, an older config's, an interrupted run) is
removed and the step redone, so that a report never mixes two settings. The runner says which steps it
reused (:attr:`StepRunner.reused`).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence, Union

from mimbench import evals
from mimbench.config import config_sha256, load_config
from mimbench.control import build_control, is_control
from mimbench.errors import MimbenchError
from mimbench.encoders import encoder_sha256
from mimbench.evals.classifier import MODEL_FILE, classifier_path
from mimbench.evals.tasks import BUILTIN_DATA, all_tasks, get_task
from mimbench.results.records import encoder_made_by, finished_record

RUNS_PLACEHOLDER = "{runs}"


def expand_runs(overrides: Sequence[str], runs: str | Path) -> tuple[str, ...]:
    """``overrides`` with :data:`RUNS_PLACEHOLDER` replaced by ``runs``, the folder that holds every step's
    pre-training folder: an override names a file an earlier step wrote as ``{runs}/<step name>/<file>``."""
    return tuple(o.replace(RUNS_PLACEHOLDER, str(runs)) for o in overrides)


@dataclass(frozen=True)
class Pretrain:
    """Pre-train encoder ``name`` with ``config`` (+ ``overrides``) on ``data``."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    data: str = BUILTIN_DATA

    @property
    def title(self) -> str:
        return f"pre-train {self.name}"


@dataclass(frozen=True)
class Control:
    """The random-initialisation control ``name``: the model of pre-training ``config`` at ``seed``, or the
    architecture of the encoder made by an earlier step named ``like`` (exactly one of the two)."""

    name: str
    config: Path | None = None
    like: str | None = None
    overrides: tuple[str, ...] = ()
    seed: int = 0

    @property
    def title(self) -> str:
        return f"{self.name} control"


@dataclass(frozen=True)
class Evaluate:
    """Evaluate encoder ``encoder`` (the name of an earlier step) on ``task`` with ``config`` (+ ``overrides``).

    ``task`` is an entry of :data:`mimbench.evals.tasks.TASKS`; the runner is called with the entry's
    ``step_options`` (segmentation: one process, single-scale test only) and, where the entry says
    ``console_log``, the task's console output kept in ``console.log`` in the step's folder.
    """

    encoder: str
    task: str
    config: Path
    overrides: tuple[str, ...] = ()
    data: str = BUILTIN_DATA
    reference: str | None = None  # a task with ``after``: the encoder whose ``after`` output is its ``reference``

    def __post_init__(self):
        get_task(self.task)  # refuses a task the table does not have

    @property
    def needs(self) -> tuple[tuple[str, str], ...]:
        """The evaluations (encoder, task) whose run folders this step reads: none, or for a task whose entry
        says ``after`` that task on this encoder (and on ``reference``); they run before it."""
        after = get_task(self.task).after
        if after is None:
            return ()
        return ((self.encoder, after),) + (((self.reference, after),) if self.reference else ())

    @property
    def title(self) -> str:
        return f"{self.task} on {self.encoder}"


Step = Union[Pretrain, Control, Evaluate]


@dataclass(frozen=True)
class Outcome:
    """What a step gave: the encoder file (pre-training, control) or the run record (evaluation)."""

    step: Step
    reused: bool
    path: Path
    record: dict | None = None


def _console_log(text: str) -> None:
    print(text)


@contextlib.contextmanager
def _console(log_file: Path | None):
    """Standard output goes to ``log_file`` inside (unchanged when None)."""
    if log_file is None:
        yield
        return
    with open(log_file, "w") as log, contextlib.redirect_stdout(log):
        yield


class StepRunner:
    """Runs steps in order under ``root``, reusing those already done by the same settings.

    ``log(text)`` receives one line per decision (``reusing ...``, ``redoing ...``); ``header(text)`` one
    line per step (default: ``log``).
    """

    def __init__(self, root: str | Path, *, log: Callable[[str], None] = _console_log,
                 header: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log
        self.header = header or log
        self.encoders: dict[str, Path] = {}
        self.outcomes: list[Outcome] = []

    # -- layout
    def encoder_path(self, name: str) -> Path:
        return self.encoders_root / name / "encoder.safetensors"

    def eval_dir(self, encoder: str, task: str) -> Path:
        return self.root / "evals" / encoder / task

    @property
    def encoders_root(self) -> Path:
        """What :data:`RUNS_PLACEHOLDER` stands for in a step's overrides."""
        return self.root / "encoders"

    @property
    def evals_root(self) -> Path:
        return self.root / "evals"

    @property
    def reused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reused]

    # -- running
    def run(self, steps: Sequence[Step]) -> list[Outcome]:
        """Run (or reuse) every step in order; returns their outcomes (also kept in :attr:`outcomes`)."""
        t0 = time.time()
        done = []
        for i, step in enumerate(steps, 1):
            self.header(f"{i}/{len(steps)} {step.title}  ({time.time() - t0:.0f} s)")
            if step.overrides:
                step = replace(step, overrides=expand_runs(step.overrides, self.encoders_root))
            if isinstance(step, Pretrain):
                outcome = self._pretrain(step)
            elif isinstance(step, Control):
                outcome = self._control(step)
            elif isinstance(step, Evaluate):
                outcome = self._evaluate(step)
            else:
                raise TypeError(f"not a step: {step!r}")
            if not isinstance(step, Evaluate):
                self.encoders[step.name] = outcome.path
            self.outcomes.append(outcome)
            done.append(outcome)
        return done

    def _clear(self, folder: Path) -> None:
        """Empty a step's folder that holds no finished result of these settings: the step starts afresh."""
        if folder.exists() and any(folder.iterdir()):
            self.log(f"redoing {folder}: no finished result of these settings there")
            shutil.rmtree(folder)

    def _pretrain(self, step: Pretrain) -> Outcome:
        enc = self.encoder_path(step.name)
        # the exported file: the encoder, or what the model writes instead (a tokenizer.safetensors)
        for made in [enc] + sorted(set(enc.parent.glob("*.safetensors")) - {enc}):
            if encoder_made_by(made, step.config, step.overrides):
                self.log(f"reusing {made}")
                return Outcome(step, True, made)
        from pretrain.main import run_pretrain  # torch and the models: only when something is pre-trained

        if self._interrupted_same_run(enc.parent, step):
            self.log(f"resuming {enc.parent} from its last checkpoint")
            path = run_pretrain(step.config, data=step.data, out=enc.parent, overrides=list(step.overrides),
                                resume=True)
            return Outcome(step, False, Path(path))
        self._clear(enc.parent)
        path = Path(run_pretrain(step.config, data=step.data, out=enc.parent, overrides=list(step.overrides)))
        return Outcome(step, False, path)

    @staticmethod
    def _interrupted_same_run(folder: Path, step: Pretrain) -> bool:
        """``folder`` holds a checkpoint of a pre-training whose resolved config (``config.py``) is this step's."""
        if not ((folder / "checkpoint-latest.pt").is_file() and (folder / "config.py").is_file()):
            return False
        try:
            done = config_sha256(load_config(folder / "config.py"))
        except MimbenchError:
            return False
        return done == config_sha256(load_config(step.config, list(step.overrides)))

    def _control(self, step: Control) -> Outcome:
        like = None
        if step.like is not None:
            if step.like not in self.encoders:
                raise MimbenchError(f"The control {step.name!r} copies encoder {step.like!r}, which no earlier step "
                                    "made.", "Put the step that makes it before the control.")
            like = self.encoders[step.like]
        enc = self.encoder_path(step.name)
        recipe = dict(like=like, config=step.config, overrides=step.overrides, seed=step.seed)
        if is_control(enc, **recipe):
            self.log(f"reusing {enc}")
            return Outcome(step, True, enc)
        self._clear(enc.parent)
        return Outcome(step, False, build_control(enc, **recipe))

    def _inputs(self, step: Evaluate) -> dict[str, Path]:
        """The run folders a step reads (:attr:`Evaluate.needs`): ``{"model": ..., "reference": ...}``; each must
        hold a finished record."""
        inputs = {}
        for key, (encoder, task) in zip(("model", "reference"), step.needs):
            folder = self.eval_dir(encoder, task)
            if finished_record(folder) is None:
                raise MimbenchError(f"Step {step.title!r} reads the {task} run of {encoder!r} ({folder}), which has not "
                                    "finished.", f"Run the {task} step of {encoder!r} first.")
            inputs[key] = folder
        return inputs

    @staticmethod
    def _lacks_model(step: Evaluate, folder: Path) -> bool:
        """A run another task reads (a task whose entry says ``after`` it) made before it kept its model (an older
        fine-tune without ``model.safetensors``): not reused."""
        return any(t.after == step.task for t in all_tasks()) and not (folder / MODEL_FILE).is_file()

    def _evaluate(self, step: Evaluate) -> Outcome:
        if step.encoder not in self.encoders:
            raise MimbenchError(f"Step {step.title!r} evaluates encoder {step.encoder!r}, which no earlier step made.",
                                "Put its pre-training or control step first.")
        encoder = self.encoders[step.encoder]
        folder = self.eval_dir(step.encoder, step.task)
        inputs = self._inputs(step)
        record = finished_record(folder, step.config, step.overrides, encoder)
        if record is not None and made_from(record, inputs) and not self._lacks_model(step, folder):
            self.log(f"reusing {folder}")
            return Outcome(step, True, folder, record)
        self._clear(folder)
        task = get_task(step.task)
        folder.mkdir(parents=True, exist_ok=True)
        options = {**task.step_options, **({"reference": inputs["reference"]} if "reference" in inputs else {})}
        with _console(folder / "console.log" if task.console_log else None):
            record = evals.run_eval(step.task, encoder=inputs.get("model", encoder), config=step.config,
                                    data=step.data, out=folder, overrides=list(step.overrides), resume=False,
                                    **options)
        return Outcome(step, False, folder, record)


def made_from(record: dict, inputs: dict[str, Path]) -> bool:
    """Whether ``record`` was made from the current files of ``inputs`` (run folders): its ``protocol.inputs``
    names the sha256 of each one's ``model.safetensors``."""
    made = (record.get("protocol") or {}).get("inputs") or {}
    return all(made.get(key) == encoder_sha256(classifier_path(folder)) for key, folder in inputs.items())


def reuse_note(outcomes: Sequence[Outcome]) -> str:
    """One line saying which steps were reused from an earlier run (empty when none were)."""
    reused = [o.step.title for o in outcomes if o.reused]
    if not reused:
        return ""
    return (f"Reused from an earlier run in the same folder (same config, overrides and encoder), {len(reused)} of "
            f"{len(outcomes)} steps: " + ", ".join(reused) + ".")


__all__ = ["BUILTIN_DATA", "Control", "Evaluate", "Outcome", "Pretrain", "RUNS_PLACEHOLDER", "Step",
           "StepRunner", "expand_runs", "reuse_note"]
