"""The Python API: pre-train and evaluate from a script with the same calls the command line makes.

``mimbench pretrain`` and every ``mimbench eval <task>`` are thin wrappers around :func:`pretrain` and
:func:`evaluate` (``mimbench/cli.py``), so a script and the CLI give the same files and the same run record
for the same inputs. Both are importable from the package (``mimbench.pretrain``, ``mimbench.evaluate``;
loaded on first use, so ``import mimbench`` stays free of torch). docs/api.md has a sweep example.

Overrides are what ``--set`` does on the command line, in either of two forms:

- a mapping of dotted config keys to Python values, ``{"optim.lr": 1e-3, "data.limit_train": 200}``
  (written into the run record as ``key=value`` strings by :func:`mimbench.config.format_override`);
- a sequence of ``key=value`` strings exactly as ``--set`` takes them, ``["optim.lr=1e-3"]`` (recorded as
  given; this is what the CLI passes).

Bad input -- an unknown task, an override that is not of either form, an option the task does not have, a
missing encoder or config file, an override key the config does not have -- raises
:class:`~mimbench.errors.MimbenchError` before any model, data or output folder is made (the last three
from :func:`mimbench.evals.runner.start` and ``pretrain.main.run_pretrain``, which check them first).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from mimbench.config import format_override, parse_override
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval  # each task's modules (torch, mmseg) are imported when the task runs
from mimbench.evals.tasks import BUILTIN_DATA, Task, get_task
from mimbench.paths import EVAL_CONFIGS, resolve_config

#: ``{dotted key: value}``, or ``key=value`` strings as ``--set`` takes them; None: no overrides.
Overrides = Union[Mapping[str, Any], Iterable[str], None]

OVERRIDES_FIX = ('Pass a dict of dotted keys to values, e.g. {"optim.lr": 1e-3}, or a list of key=value '
                 'strings as --set takes them, e.g. ["optim.lr=1e-3"].')


def override_strings(overrides: Overrides) -> list[str]:
    """``overrides`` as the ``key=value`` strings the config loader takes; MimbenchError for anything that
    is neither a mapping with string keys nor a sequence of ``key=value`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        bad = [k for k in overrides if not isinstance(k, str) or not k.strip()]
        if bad:
            raise MimbenchError(f"Override keys must be non-empty dotted strings; got {bad!r}.", OVERRIDES_FIX)
        return [format_override(k, v) for k, v in overrides.items()]
    if isinstance(overrides, (str, bytes)):
        raise MimbenchError(f"overrides is one string ({overrides!r}), not a dict or a list of key=value strings.",
                            OVERRIDES_FIX)
    items = list(overrides)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise MimbenchError(f"Override {bad[0]!r} is not a key=value string.", OVERRIDES_FIX)
    for item in items:
        parse_override(item)  # MimbenchError for "key" without "=" or an empty key
    return items


def _task_options(task: Task, options: Mapping[str, Any]) -> dict:
    """``options`` checked against the task's own options (names, and values where the entry lists choices)."""
    known = {opt.name: opt for opt in task.options}
    for name, value in options.items():
        if name not in known:
            have = ", ".join(known) or "none"
            raise MimbenchError(f"The {task.name} evaluation has no option {name!r}.",
                                f"Its options: {have} (besides data, config, out, overrides, layout, resume).")
        choices = known[name].choices
        if choices and value is not None and value not in choices:  # None: the option left unset
            raise MimbenchError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.",
                                f"Pass {name} as one of those.")
    return dict(options)


def default_out(task: str, encoder: str | Path) -> Path:
    """Where :func:`evaluate` writes when ``out`` is None: ``runs/eval/<task>/<encoder file stem>`` below the
    working directory."""
    return Path("runs") / "eval" / task / Path(encoder).stem


def evaluate(task: str, encoder: str | Path, data: str | None = None, config: str | Path | None = None,
             out: str | Path | None = None, overrides: Overrides = None, *, layout: str = "auto",
             resume: bool = False, **options) -> dict:
    """Evaluate ``encoder`` on ``task``; returns the run record (the dict the CLI writes as ``<task>-<id>.json``).

    Args:
        task: a task of the table, :mod:`mimbench.evals.tasks` (``knn``, ``linear``, ``attentive``, ``finetune``, ``segment``).
        encoder: an encoder file, or a checkpoint in a supported layout (see ``layout``).
        data: ``builtin:fashion-mnist``, an ImageNet-style folder, an ADE20K root ... (None: the task's default
            data, as ``mimbench eval <task>`` without ``--data``).
        config: an evaluation config, anything ``--config`` takes (None: the task's demo config).
        out: the run's folder (record, checkpoints, feature cache; None: :func:`default_out`).
        overrides: ``--set`` values, a dict or ``key=value`` strings (module docstring).
        layout: the checkpoint layout of ``encoder`` (``--from``; ``auto`` detects it).
        resume: continue from ``out``'s last checkpoint (``--resume``).
        options: the task's own options (``segment``: ``launcher``, ``aug_test``).
    """
    entry = get_task(task)
    strings = override_strings(overrides)
    extra = _task_options(entry, options)
    config = resolve_config(EVAL_CONFIGS / entry.demo_config if config is None else config)
    data = entry.default_data if data is None else data
    out = default_out(entry.name, encoder) if out is None else Path(out)
    return run_eval(entry.name, encoder=Path(encoder), config=config, data=data, out=out, overrides=strings,
                    resume=resume, layout=layout, **extra)


def pretrain(config: str | Path, out: str | Path, overrides: Overrides = None, *, data: str = BUILTIN_DATA,
             resume: bool = False) -> Path:
    """Pre-train as ``config`` says; returns the exported file: ``out/encoder.safetensors`` (a VQ-KD tokenizer
    config: ``out/tokenizer.safetensors``).

    Args:
        config: a pre-training config, anything ``--config`` takes.
        out: the run's folder (checkpoints, ``log.jsonl``, the resolved ``config.py``, the exported file).
        overrides: ``--set`` values, a dict or ``key=value`` strings (module docstring).
        data: ``builtin:fashion-mnist`` or an ImageNet-style folder.
        resume: continue from ``out/checkpoint-latest.pt``.
    """
    strings = override_strings(overrides)
    from pretrain.main import run_pretrain  # torch and the pre-training models

    return Path(run_pretrain(resolve_config(config), data=data, out=Path(out), overrides=strings, resume=resume))


__all__ = ["Overrides", "default_out", "evaluate", "override_strings", "pretrain"]
