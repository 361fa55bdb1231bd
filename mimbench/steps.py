"""Pipelines as lists of steps -- pre-train, build the random control, build data, evaluate, analyse -- run by one
runner.

``mimbench demo`` and ``mimbench reproduce --scale demo`` are both a list of :class:`Pretrain`,
:class:`Control`, :class:`Build`, :class:`Evaluate` and :class:`Analyze` steps handed to :class:`StepRunner`.
Under the runner's root::

    encoders/<name>/encoder.safetensors    the pre-training folder (config.py, log.jsonl, checkpoints) or the control
                                           (a VQ-KD pre-training exports tokenizer.safetensors instead)
    evals/<name>/<task>/                   the evaluation's run record (and its logs)
    analysis/<name>/                       the analysis record and figures of an encoder

A step's overrides may name a file an earlier step wrote as ``{runs}/<name>/<file>``; the runner reads
``{runs}`` as its ``encoders/`` folder (:func:`expand_runs`).

The reuse rule, the same for every step: a step is reused only when its result is already there and was
made from the same config, the same ``--set`` overrides and, for an evaluation, the same encoder file:

- pre-training: the exported file's ``config_sha256`` equals the hash of the resolved config (an interrupted
  pre-training whose folder holds ``checkpoint-latest.pt`` and the same resolved ``config.py`` is resumed);
- control: the control file's recipe hash (:func:`mimbench.control.control_sha256`) matches;
- evaluation: a finished record (status ok) whose ``protocol.sha256`` is the resolved config's hash and whose
  ``encoder.sha256`` is the encoder file's (so a re-trained encoder is evaluated again);
- analysis: likewise, its settings' hash and the encoder file's;
- data: the builder itself keeps a set made by the same parameters (its manifest); the step counts as reused when
  it wrote nothing.

Otherwise whatever is in the step's folder (another size's result, an older config's, an interrupted run) is
removed and the step redone, so that a report never mixes two settings. The runner says which steps it
reused (:attr:`StepRunner.reused`).

Steps side by side (``StepRunner.run(steps, jobs=N)``, ``--jobs`` of ``mimbench demo`` and ``reproduce``): the
runner decides (reuse, redo, resume) in its own process and hands each step to do to one of ``N`` worker
processes (``spawn``), a step starting once the steps it needs
(:func:`plan`) are done: an evaluation waits for the step that made its encoder, for the tasks its entry lists
in ``after`` on the same encoder, and for the previous task of the same encoder that shares its feature cache;
a step whose overrides name ``{runs}/<name>/`` waits for step ``<name>``; an evaluation whose data a
:class:`Build` step makes waits for it; an analysis waits for its encoder's step; pre-trainings of different encoders
and builds wait for nothing. Every step, side by side or one by one, runs with the same number of torch threads
(:data:`STEP_THREADS`), because a different count changes the last bits of float sums (k-NN ties, the low-shot
solver, segmentation's mIoU moved by 0.05 in a demo run with 2 threads against 1): so a step's numbers depend
only on its config, overrides, data and encoder (every step seeds its own RNGs), not on ``--jobs``, the machine's
core count, which worker runs it or when. A worker's console output goes to the step's
``console.log`` (in its encoder or evaluation folder); the terminal shows one line as a step starts and one
as it ends. When a step fails, no further step starts, the running ones finish, and the first error is
raised: as one by one, a rerun reuses every step that finished. Each outcome carries its time
(:attr:`Outcome.seconds`; :func:`timing_rows`).
"""
from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import re
import shutil
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch

from mimbench import evals
from mimbench.atomic import atomic_write
from mimbench.config import config_sha256, load_config
from mimbench.control import build_control, is_control
from mimbench.errors import MimbenchError
from mimbench.encoders import encoder_sha256
from mimbench.evals.classifier import MODEL_FILE, classifier_path
from mimbench.evals.tasks import BUILTIN_DATA, all_tasks, get_task, resolve
from mimbench.results.records import encoder_made_by, finished_record

RUNS_PLACEHOLDER = "{runs}"
#: torch threads of every pipeline step, whatever ``--jobs``: the table does not depend on how the steps were
#: scheduled. On the demo's small models two 1-thread processes give 1.7x the throughput of one 2-thread process on a
#: 2-core Intel Xeon (AMX), 1.2x on a 2-core AMD EPYC (AVX-512), so the default is one step per core.
STEP_THREADS = 1
_RUNS_REF = re.compile(re.escape(RUNS_PLACEHOLDER) + r"/([^/'\"]+)/")


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


@dataclass(frozen=True)
class Build:
    """Build data ``root`` with ``builder`` (``"module:function(root, **kwargs) -> root"``, e.g. a task entry's
    ``demo_data``); an evaluation whose ``data`` is ``root`` waits for it. The builder reuses a set already there."""

    label: str
    builder: str
    root: Path
    kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def title(self) -> str:
        return f"build {self.label} data"


@dataclass(frozen=True)
class Analyze:
    """``mimbench analyze`` of encoder ``encoder`` (the name of an earlier step) on ``data`` with ``settings``
    (:func:`mimbench.analysis.run.run_analyze` keywords); with its pre-training run when the encoder's folder is
    one. Written under the runner's ``analysis/<encoder>/``."""

    encoder: str
    settings: tuple[tuple[str, object], ...] = ()
    data: str = BUILTIN_DATA

    @property
    def title(self) -> str:
        return f"analyze {self.encoder}"


Step = Union[Pretrain, Control, Evaluate, Build, Analyze]


@dataclass(frozen=True)
class Outcome:
    """What a step gave: the encoder file (pre-training, control) or the run record (evaluation)."""

    step: Step
    reused: bool
    path: Path
    record: dict | None = None
    seconds: float = 0.0       # wall time of the step (deciding, and doing it when not reused)
    log: Path | None = None    # its console output, when it ran in a worker process


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


@dataclass(frozen=True)
class Work:
    """A step to do (its result is not there): everything doing it needs, so that a worker process can."""

    step: Step                   # its overrides with {runs} expanded
    folder: Path                 # where it writes: the encoder's or the evaluation's folder
    encoder: Path | None = None  # an evaluation's encoder file, or the file a control copies
    resume: bool = False         # a pre-training resumed from its last checkpoint
    reference: Path | None = None  # an evaluation's reference run folder (Evaluate.reference's ``after`` output)

    @property
    def log(self) -> Path:
        """The step's console output when it runs in a worker process."""
        return self.folder / "console.log"


def do_work(work: Work, console: bool = True) -> Outcome:
    """Do ``work`` in this process; ``console``: a task whose entry says ``console_log`` writes there."""
    step = work.step
    if isinstance(step, Pretrain):
        from pretrain.main import run_pretrain  # torch and the models: only when something is pre-trained

        path = run_pretrain(step.config, data=step.data, out=work.folder, overrides=list(step.overrides),
                            resume=work.resume)
        return Outcome(step, False, Path(path))
    if isinstance(step, Control):
        return Outcome(step, False, build_control(work.folder / "encoder.safetensors", like=work.encoder,
                                                  config=step.config, overrides=step.overrides, seed=step.seed))
    if isinstance(step, Build):
        before = _files(Path(step.root))
        root = Path(resolve(step.builder, step.label)(step.root, **dict(step.kwargs)))
        return Outcome(step, bool(before) and _files(root) == before, root)  # reused: the builder wrote nothing
    if isinstance(step, Analyze):
        from mimbench.analysis.demo import analyze_encoder  # torch, timm and the probes: only when analysed

        return Outcome(step, False, work.folder, analyze_encoder(work.encoder, work.folder, dict(step.settings),
                                                                 step.data))
    task = get_task(step.task)
    work.folder.mkdir(parents=True, exist_ok=True)
    options = {**task.step_options, **({"reference": work.reference} if work.reference is not None else {})}
    with _console(work.folder / "console.log" if task.console_log and console else None):
        record = evals.run_eval(step.task, encoder=work.encoder, config=step.config, data=step.data, out=work.folder,
                                overrides=list(step.overrides), resume=False, **options)
    return Outcome(step, False, work.folder, record)


def _files(root: Path) -> set[tuple[str, int, int]]:
    """(path, size, mtime) of every file under ``root`` but a step's console.log: what a build step wrote."""
    return {(str(p), st.st_size, st.st_mtime_ns) for p in root.rglob("*") if p.name != "console.log"
            and p.is_file() and (st := p.stat())} if root.is_dir() else set()


def _no_maker(step: Step, name: str) -> MimbenchError:
    if isinstance(step, Control):
        return MimbenchError(f"The control {step.name!r} copies encoder {name!r}, which no earlier step made.",
                             "Put the step that makes it before the control.")
    return MimbenchError(f"Step {step.title!r} evaluates encoder {name!r}, which no earlier step made.",
                         "Put its pre-training or control step first.")


def _evaluation_needs(i: int, steps: Sequence[Step], evaluations: dict, caches: dict) -> set[int]:
    """The earlier evaluations that evaluation ``steps[i]`` waits for: those whose run folders it reads
    (:attr:`Evaluate.needs`: the task its entry says ``after``, on its encoder and its reference; refused when they
    come later in the list), an earlier one of the same folder, and the previous one of the same encoder sharing its
    feature cache (which extracts the features it reads)."""
    step = steps[i]
    need = set()
    for encoder, before in step.needs:
        if (encoder, before) in evaluations:
            need.add(evaluations[encoder, before])
        elif any(isinstance(s, Evaluate) and (s.encoder, s.task) == (encoder, before) for s in steps[i:]):
            raise MimbenchError(f"Step {step.title!r} reads the output of {before} on {encoder}, which comes "
                                "after it in the list.", f"Put the {before} evaluation of {encoder} first.")
    if (step.encoder, step.task) in evaluations:  # the same folder twice: one after the other
        need.add(evaluations[step.encoder, step.task])
    if get_task(step.task).feature_cache:
        if step.encoder in caches:
            need.add(caches[step.encoder])
        caches[step.encoder] = i
    evaluations[step.encoder, step.task] = i
    return need


def plan(steps: Sequence[Step], made: Iterable[str] = ()) -> list[frozenset[int]]:
    """For each step, the indices of the earlier steps it needs (see the module docstring); ``made``: encoders
    that exist before the first step. MimbenchError, before any work, for a step that needs a later one."""
    made = set(made)
    makers: dict[str, int] = {}
    evaluations: dict[tuple[str, str], int] = {}
    caches: dict[str, int] = {}
    builds = {str(step.root): i for i, step in enumerate(steps) if isinstance(step, Build)}
    needs = []
    for i, step in enumerate(steps):
        need = {makers[name] for name in _RUNS_REF.findall(" ".join(getattr(step, "overrides", ()))) if name in makers}
        used = step.encoder if isinstance(step, (Evaluate, Analyze)) else getattr(step, "like", None)
        if used is not None:
            if used in makers:
                need.add(makers[used])
            elif used not in made:
                raise _no_maker(step, used)
        if isinstance(step, Evaluate):
            need |= _evaluation_needs(i, steps, evaluations, caches)
            if step.data in builds:
                if builds[step.data] > i:
                    raise MimbenchError(f"Step {step.title!r} reads data {step.data}, which a later step builds.",
                                        f"Put the step {steps[builds[step.data]].title!r} first.")
                need.add(builds[step.data])
        elif isinstance(step, (Build, Analyze)):
            pass  # a build waits for nothing; an analysis for its encoder alone
        else:
            if step.name in makers:  # the same folder twice: one after the other
                need.add(makers[step.name])
            makers[step.name] = i
        needs.append(frozenset(need))
    return needs


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_jobs() -> int:
    """``--jobs`` by default: as many steps side by side as the cores hold at :data:`STEP_THREADS` each."""
    return max(1, usable_cores() // STEP_THREADS)


@contextlib.contextmanager
def _output_to(log_file: Path):
    """The process's standard output and error (Python's and the libraries' own) go to ``log_file`` inside."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _work_in_worker(work: Work, threads: int) -> Outcome:
    """Do ``work`` in a worker process with ``threads`` torch threads (set again for every step: a library may have
    changed OpenMP's count in an earlier one), its console output in ``work.log`` (a failure's traceback too)."""
    start = time.perf_counter()
    torch.set_num_threads(threads)
    work.folder.mkdir(parents=True, exist_ok=True)
    with _output_to(work.log):
        print(f"{work.step.title}: process {os.getpid()}, {torch.get_num_threads()} torch threads", flush=True)
        try:
            outcome = do_work(work, console=False)
        except BaseException:
            traceback.print_exc()
            raise
    return replace(outcome, seconds=time.perf_counter() - start, log=work.log)


class StepRunner:
    """Runs steps under ``root``, one by one in this process or side by side in workers, reusing those
    already done by the same settings.

    ``log(text)`` receives one line per decision (``reusing ...``, ``redoing ...``) and, side by side, one per
    finished step; ``header(text)`` one line per step as it starts (default: ``log``).
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

    def analysis_dir(self, encoder: str) -> Path:
        return self.analysis_root / encoder

    @property
    def encoders_root(self) -> Path:
        """What :data:`RUNS_PLACEHOLDER` stands for in a step's overrides."""
        return self.root / "encoders"

    @property
    def evals_root(self) -> Path:
        return self.root / "evals"

    @property
    def analysis_root(self) -> Path:
        return self.root / "analysis"

    @property
    def reused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reused]

    # -- running
    def run(self, steps: Sequence[Step], jobs: int = 1, threads: int = STEP_THREADS) -> list[Outcome]:
        """Run (or reuse) every step with ``threads`` torch threads; returns their outcomes in the order of ``steps``
        (also appended to :attr:`outcomes`). ``jobs`` > 1: that many steps side by side in worker processes; 1: one
        after another in this process (its thread count restored at the end)."""
        needs = plan(steps, self.encoders)
        if jobs > 1 and steps:
            return self._run_side_by_side(steps, needs, jobs, threads)
        t0, done, before = time.time(), [], torch.get_num_threads()
        try:
            for i, step in enumerate(steps, 1):
                self.header(f"{i}/{len(steps)} {step.title}  ({time.time() - t0:.0f} s)")
                start = time.perf_counter()
                todo = self.prepare(step)
                torch.set_num_threads(threads)  # again for every step: a library may have changed OpenMP's count
                outcome = todo if isinstance(todo, Outcome) else do_work(todo)
                done.append(self._finish(replace(outcome, seconds=time.perf_counter() - start)))
        finally:
            torch.set_num_threads(before)
        return done

    def _finish(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome.step, (Pretrain, Control)):
            self.encoders[outcome.step.name] = outcome.path
        self.outcomes.append(outcome)
        return outcome

    def _run_side_by_side(self, steps: Sequence[Step], needs: list[frozenset[int]], jobs: int,
                          threads: int) -> list[Outcome]:
        """:meth:`run` with ``jobs`` worker processes; see the module docstring for the order and failures."""
        state = _Schedule(steps, needs, time.time(), min(jobs, len(steps)))
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=state.jobs, mp_context=context) as pool:
            self._start_ready(state, pool, threads)
            while state.running:
                finished, _ = wait(state.running, return_when=FIRST_COMPLETED)
                for future in finished:
                    self._collect(state, future)
                if state.failure is None:
                    self._start_ready(state, pool, threads)
        if state.failure is not None:
            raise state.failure
        return [state.outcomes[i] for i in range(len(steps))]

    def _start_ready(self, state: "_Schedule", pool: ProcessPoolExecutor, threads: int) -> None:
        """Decide the steps whose needs are done, in list order: reuse each, or hand it to an idle worker (no
        more than the workers, so that a step starts when it is handed over; none once a step failed)."""
        ready = state.ready()
        while ready and state.failure is None and len(state.running) < state.jobs:
            i = ready.pop(0)
            state.waiting.remove(i)
            self.header(f"{i + 1}/{state.n} {state.steps[i].title}  ({state.elapsed():.0f} s)")
            try:
                todo = self.prepare(state.steps[i])
            except Exception as err:  # noqa: BLE001 - the first failure is raised once the running steps end
                state.failure = err
                return
            if isinstance(todo, Outcome):
                state.outcomes[i] = self._finish(todo)
                ready = state.ready()
            else:
                state.running[pool.submit(_work_in_worker, todo, threads)] = i

    def _collect(self, state: "_Schedule", future: Future) -> None:
        i = state.running.pop(future)
        title = f"{i + 1}/{state.n} {state.steps[i].title}"
        try:
            outcome = future.result()
        except BaseException as err:  # noqa: BLE001 - raised by run() once the running steps end
            log = self._log_file(state.steps[i])
            self.log(f"{title} failed after {state.elapsed():.0f} s (its output: {log}); no further step starts"
                     + (f", {len(state.running)} running to their end" if state.running else ""))
            state.failure = state.failure or err
            return
        state.outcomes[i] = self._finish(outcome)
        self.log(f"{title} done in {outcome.seconds:.0f} s (its output: {outcome.log})")

    def _log_file(self, step: Step) -> Path:
        if isinstance(step, Evaluate):
            return self.eval_dir(step.encoder, step.task) / "console.log"
        if isinstance(step, Build):
            return Path(step.root) / "console.log"
        if isinstance(step, Analyze):
            return self.analysis_dir(step.encoder) / "console.log"
        return self.encoder_path(step.name).parent / "console.log"

    def prepare(self, step: Step) -> Outcome | Work:
        """The step's outcome when its result is there (reused), else the work to do (its folder cleared)."""
        if getattr(step, "overrides", ()):
            step = replace(step, overrides=expand_runs(step.overrides, self.encoders_root))
        if isinstance(step, Pretrain):
            return self._pretrain(step)
        if isinstance(step, Control):
            return self._control(step)
        if isinstance(step, Evaluate):
            return self._evaluate(step)
        if isinstance(step, Build):
            return Work(step, Path(step.root))  # the builder itself reuses a set already there
        if isinstance(step, Analyze):
            return self._analyze(step)
        raise TypeError(f"not a step: {step!r}")

    def _analyze(self, step: Analyze) -> Outcome | Work:
        from mimbench.analysis.demo import finished_analysis

        if step.encoder not in self.encoders:
            raise _no_maker(step, step.encoder)
        encoder, folder = self.encoders[step.encoder], self.analysis_dir(step.encoder)
        record = finished_analysis(folder, encoder, dict(step.settings))
        if record is not None:
            self.log(f"reusing {folder}")
            return Outcome(step, True, folder, record)
        self._clear(folder)
        return Work(step, folder, encoder=encoder)

    def _clear(self, folder: Path) -> None:
        """Empty a step's folder that holds no finished result of these settings: the step starts afresh."""
        if folder.exists() and any(folder.iterdir()):
            self.log(f"redoing {folder}: no finished result of these settings there")
            shutil.rmtree(folder)

    def _pretrain(self, step: Pretrain) -> Outcome | Work:
        enc = self.encoder_path(step.name)
        # the exported file: the encoder, or what the model writes instead (a tokenizer.safetensors)
        for made in [enc] + sorted(set(enc.parent.glob("*.safetensors")) - {enc}):
            if encoder_made_by(made, step.config, step.overrides):
                self.log(f"reusing {made}")
                return Outcome(step, True, made)
        if self._interrupted_same_run(enc.parent, step):
            self.log(f"resuming {enc.parent} from its last checkpoint")
            return Work(step, enc.parent, resume=True)
        self._clear(enc.parent)
        return Work(step, enc.parent)

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

    def _control(self, step: Control) -> Outcome | Work:
        like = None
        if step.like is not None:
            if step.like not in self.encoders:
                raise _no_maker(step, step.like)
            like = self.encoders[step.like]
        enc = self.encoder_path(step.name)
        if is_control(enc, like=like, config=step.config, overrides=step.overrides, seed=step.seed):
            self.log(f"reusing {enc}")
            return Outcome(step, True, enc)
        self._clear(enc.parent)
        return Work(step, enc.parent, encoder=like)

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

    def _evaluate(self, step: Evaluate) -> Outcome | Work:
        if step.encoder not in self.encoders:
            raise _no_maker(step, step.encoder)
        encoder = self.encoders[step.encoder]
        folder = self.eval_dir(step.encoder, step.task)
        inputs = self._inputs(step)
        record = finished_record(folder, step.config, step.overrides, encoder)
        if record is not None and made_from(record, inputs) and not self._lacks_model(step, folder):
            self.log(f"reusing {folder}")
            return Outcome(step, True, folder, record)
        self._clear(folder)
        return Work(step, folder, encoder=inputs.get("model", encoder), reference=inputs.get("reference"))


@dataclass
class _Schedule:
    """Where a side-by-side run stands: steps waiting, running (future -> index), done, the first failure."""

    steps: Sequence[Step]
    needs: list[frozenset[int]]
    t0: float
    jobs: int
    waiting: list[int] = field(init=False)
    running: dict[Future, int] = field(default_factory=dict)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    failure: BaseException | None = None

    def __post_init__(self):
        self.waiting = list(range(len(self.steps)))

    @property
    def n(self) -> int:
        return len(self.steps)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def ready(self) -> list[int]:
        return [i for i in self.waiting if self.needs[i].issubset(self.outcomes)]


def timing_rows(outcomes: Sequence[Outcome]) -> list[dict]:
    """One row per step: its title, whether it ran or was reused, its seconds and where its output went."""
    return [dict(step=o.step.title, status="reused" if o.reused else "ran", seconds=round(o.seconds, 1),
                 log=str(o.log or "")) for o in outcomes]


def write_timings(outcomes: Sequence[Outcome], path: Path) -> Path:
    """:func:`timing_rows` as a CSV file (``steps.csv`` beside a pipeline's report)."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "status", "seconds", "log"])
            writer.writeheader()
            writer.writerows(timing_rows(outcomes))

    atomic_write(Path(path), write, what="the step timings", fix="Choose an --out folder you can write to.")
    return Path(path)


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


__all__ = ["Analyze", "BUILTIN_DATA", "Build", "Control", "Evaluate", "Outcome", "Pretrain", "RUNS_PLACEHOLDER",
           "STEP_THREADS", "Step", "StepRunner", "Work", "default_jobs", "do_work", "expand_runs", "plan",
           "reuse_note", "timing_rows", "usable_cores", "write_timings"]
