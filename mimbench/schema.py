"""Config schemas: the keys each kind of config may hold, their types and their allowed ranges.

A config file or a ``--set`` override with an unknown key, a value of the wrong type or a value out of
range is refused by :func:`validate` before any work starts, with the key, the value, where it came from
and what is allowed (and the closest known key for a typo). Kinds: ``pretrain``, ``linear``,
``finetune``, ``knn`` and ``segment``.

Sections are *closed* (every key must be known) except where a schema says otherwise: a pre-training
``model`` section passes its keys to the model constructor, which refuses unknown ones itself, and a
segmentation config is an mmsegmentation config whose top level holds helper variables of any name, so
only the keys mimbench reads there are checked (crop size, class count, iterations, batch size,
checkpoint interval, seed). Numbers: an ``int`` field takes integers only (not ``True``/``False``), a
``float`` field integers or floats; both must be finite.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from mimbench.errors import MimbenchError

__all__ = ["Num", "Choice", "Flag", "Text", "Seq", "Section", "SCHEMAS", "KINDS", "validate", "knows_key"]


@dataclass(frozen=True)
class Num:
    """A number: ``kind`` int or float, within [lo, hi] (``lo_open``/``hi_open`` exclude the ends)."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: bool = False

    def problem(self, v) -> str | None:
        if v is None:
            return None if self.none else "must be set"
        if isinstance(v, bool) or not isinstance(v, (int, float) if self.kind is float else int):
            return f"is a {type(v).__name__}"
        if not math.isfinite(v):
            return "is not finite"
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return "is out of range"
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return "is out of range"
        return None

    def allowed(self) -> str:
        text = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            text += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text += f" {'<' if self.hi_open else '<='} {self.hi:g}"
        return text + (" or None" if self.none else "")


@dataclass(frozen=True)
class Choice:
    values: tuple
    none: bool = False

    def problem(self, v) -> str | None:
        if v is None and self.none:
            return None
        return None if any(v == c and type(v) is type(c) for c in self.values) else "is not one of the choices"

    def allowed(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.values) + (" or None" if self.none else "")


@dataclass(frozen=True)
class Flag:
    def problem(self, v) -> str | None:
        return None if isinstance(v, bool) else f"is a {type(v).__name__}"

    def allowed(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Text:
    none: bool = False

    def problem(self, v) -> str | None:
        if v is None:
            return None if self.none else "must be set"
        return None if isinstance(v, str) else f"is a {type(v).__name__}"

    def allowed(self) -> str:
        return "a string" + (" or None" if self.none else "")


@dataclass(frozen=True)
class Seq:
    """A list or tuple of ``item``s (exactly ``length`` of them when given)."""

    item: Any
    length: int | None = None
    none: bool = False

    def problem(self, v) -> str | None:
        if v is None:
            return None if self.none else "must be set"
        if not isinstance(v, (list, tuple)):
            return f"is a {type(v).__name__}"
        if self.length is not None and len(v) != self.length:
            return f"has {len(v)} items"
        bad = [x for x in v if self.item.problem(x)]
        return f"holds {bad[0]!r}" if bad else None

    def allowed(self) -> str:
        n = f"{self.length} " if self.length is not None else ""
        return f"a list of {n}items, each {self.item.allowed()}" + (" or None" if self.none else "")


@dataclass(frozen=True)
class Section:
    """A dict of known keys; ``open`` sections also accept keys they do not list."""

    keys: Mapping[str, Any]
    open: bool = False
    required: tuple = ()
    checks: tuple = field(default=())  # (predicate(dict) -> bool, message) pairs across keys

    def problem(self, v) -> str | None:
        return None if isinstance(v, Mapping) else f"is a {type(v).__name__}, not a section (dict)"

    def allowed(self) -> str:
        return "a dict"


INT_GE0, INT_GE1 = Num(int, lo=0), Num(int, lo=1)
FRACTION = Num(float, 0.0, 1.0)
AMP = Choice(("auto", "bf16", "fp16", "none"))
SCHEDULE = Section({"epochs": INT_GE1, "warmup_epochs": Num(float, lo=0), "min_lr": Num(float, lo=0)},
                   checks=((lambda s: "epochs" not in s or "warmup_epochs" not in s or s["warmup_epochs"] < s["epochs"],
                            "schedule.warmup_epochs must be below schedule.epochs"),))
BETAS = Seq(Num(float, 0.0, 1.0, hi_open=True), length=2)
LR = Num(float, lo=0, lo_open=True, none=True)
LOOP = {"amp": AMP, "ckpt_every": INT_GE0, "ckpt_every_steps": INT_GE0, "log_every": INT_GE1, "progress": Flag(),
        "tensorboard": Flag(), "seed": INT_GE0, "num_workers": INT_GE0, "img_size": Num(int, lo=1, none=True), "deviations": Seq(Text())}
EVAL_DATA = Section({"limit_train": Num(int, lo=1, none=True), "limit_val": Num(int, lo=1, none=True),
                     "max_bad_fraction": FRACTION})
BATCH = {"batch_size": INT_GE1, "eff_batch_size": Num(int, lo=1, none=True), "accum_iter": INT_GE1}
HAS_LR = ((lambda o: o.get("lr") is not None or o.get("blr") is not None, "optim needs lr or blr"),)

SCHEMAS: dict[str, Section] = {
    "pretrain": Section({
        "technique": Text(none=True),
        "model": Section({"name": Text()}, open=True, required=("name",)),
        "data": Section({"img_size": INT_GE1, "num_workers": INT_GE0, "limit": Num(int, lo=1, none=True),
                         "max_bad_fraction": FRACTION}),
        "optim": Section({"blr": Num(float, lo=0, lo_open=True), "weight_decay": Num(float, lo=0), "betas": BETAS,
                          "clip_grad": Num(float, lo=0, lo_open=True, none=True), **BATCH},
                         required=("blr", "batch_size")),
        "schedule": SCHEDULE,
        "runtime": Section({"seed": INT_GE0, "ckpt_every": INT_GE0, "ckpt_every_steps": INT_GE0, "log_every": INT_GE1,
                            "mask_ratio": Num(float, 0.0, 1.0, lo_open=True, hi_open=True, none=True), "amp": AMP,
                            "compile": Flag(), "progress": Flag(), "tensorboard": Flag()}),
    }, required=("model", "optim", "schedule", "runtime")),
    "linear": Section({
        **LOOP, "mode": Choice(("protocol", "cached")),
        "optim": Section({"name": Choice(("lars", "adam")), "blr": LR, "lr": LR, "momentum": FRACTION,
                          "trust_coeff": Num(float, lo=0), "weight_decay": Num(float, lo=0), "betas": BETAS, **BATCH},
                         required=("batch_size",), checks=HAS_LR),
        "schedule": SCHEDULE, "augment": Section({"scale": Seq(Num(float, 0.0, 1.0, lo_open=True), length=2)}),
        "data": EVAL_DATA, "cache_dir": Text(none=True), "feature_batch_size": INT_GE1,
    }, required=("optim", "schedule")),
    "finetune": Section({
        **LOOP, "clip_grad": Num(float, lo=0, lo_open=True, none=True),
        "model": Section({"drop_path": Num(float, 0.0, 1.0, hi_open=True), "head_init_std": Num(float, lo=0)},
                         required=("drop_path",)),
        "optim": Section({"blr": LR, "lr": LR, "weight_decay": Num(float, lo=0),
                          "layer_decay": Num(float, 0.0, 1.0, lo_open=True), "betas": BETAS, **BATCH},
                         required=("batch_size", "weight_decay", "layer_decay"), checks=HAS_LR),
        "schedule": SCHEDULE,
        "mixup": Section({"mixup": Num(float, lo=0), "cutmix": Num(float, lo=0),
                          "smoothing": Num(float, 0.0, 1.0, hi_open=True), "prob": FRACTION, "switch_prob": FRACTION,
                          "mode": Choice(("batch", "pair", "elem"))},
                         required=("mixup", "cutmix", "smoothing")),
        "augment": Section({"mode": Choice(("timm", "tensor")), "auto_augment": Text(none=True), "re_prob": FRACTION,
                            "re_mode": Choice(("const", "rand", "pixel")), "re_count": INT_GE1}),
        "data": EVAL_DATA,
    }, required=("model", "optim", "schedule", "mixup", "augment")),
    "knn": Section({
        "knn": Section({"k": INT_GE1, "temperature": Num(float, lo=0, lo_open=True)}),
        "img_size": Num(int, lo=1, none=True), "batch_size": INT_GE1, "num_workers": INT_GE0, "data": EVAL_DATA,
        "cache_dir": Text(none=True), "deviations": Seq(Text()), "seed": INT_GE0,
    }),
    "segment": Section({
        "crop_size": Seq(INT_GE1, length=2), "num_classes": INT_GE1, "max_iters": INT_GE1,
        "train_cfg": Section({"max_iters": INT_GE1, "val_interval": INT_GE1}, open=True),
        "train_dataloader": Section({"batch_size": INT_GE1, "num_workers": INT_GE0}, open=True),
        "default_hooks": Section({"checkpoint": Section({"interval": INT_GE1, "max_keep_ckpts": Num(int)}, open=True)},
                                 open=True),
        "randomness": Section({"seed": Num(int, lo=0, none=True)}, open=True),
    }, open=True, required=("model", "train_dataloader", "test_dataloader", "test_evaluator", "optim_wrapper",
                            "train_cfg", "crop_size")),
}
KINDS = tuple(SCHEMAS)


def _section(kind: str) -> Section:
    if kind not in SCHEMAS:
        raise MimbenchError(f"Unknown config kind {kind!r}.", f"Use one of: {', '.join(KINDS)}.")
    return SCHEMAS[kind]


def knows_key(kind: str, dotted: str) -> bool:
    """True when ``dotted`` names a key the schema of ``kind`` lists (so ``--set`` may add it)."""
    node: Any = _section(kind)
    for part in dotted.split("."):
        if not isinstance(node, Section):
            return False
        if part not in node.keys:
            return node.open
        node = node.keys[part]
    return True


def validate(cfg: Mapping, kind: str, *, source: str, overridden: Mapping[str, Any] = ()) -> None:
    """Raise one MimbenchError listing every key of ``cfg`` that the ``kind`` schema refuses.

    ``source`` names the config file; keys in ``overridden`` are reported as coming from ``--set``.
    """
    problems: list[str] = []

    def origin(key: str) -> str:
        return "--set" if key in overridden else source

    def walk(node: Mapping, spec: Section, prefix: str) -> None:
        for req in spec.required:
            if req not in node:
                problems.append(f"`{prefix}{req}` is missing ({source}); it must be "
                                f"{_describe(spec.keys.get(req))}")
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            sub = spec.keys.get(key)
            if sub is None:
                if not spec.open:
                    near = difflib.get_close_matches(str(key), list(spec.keys), n=1)
                    hint = f"; did you mean `{prefix}{near[0]}`?" if near else ""
                    problems.append(f"unknown key `{dotted}` ({origin(dotted)}){hint} Known keys here: "
                                    f"{', '.join(sorted(spec.keys))}")
                continue
            why = sub.problem(value)
            if why:
                problems.append(f"`{dotted}` = {value!r} ({origin(dotted)}) {why}; allowed: {sub.allowed()}")
            elif isinstance(sub, Section):
                walk(value, sub, dotted + ".")
        if not any(p.startswith(f"`{prefix}") for p in problems):
            for ok, message in spec.checks:
                if not ok(node):
                    problems.append(f"{message} ({origin(prefix.rstrip('.'))})")

    walk(cfg, _section(kind), "")
    if problems:
        raise MimbenchError(f"The {kind} config is not valid:\n  - " + "\n  - ".join(problems),
                            f"Fix {source} (or the --set values); every key, its type and range are listed in "
                            "mimbench/schema.py.")


def _describe(spec) -> str:
    return spec.allowed() if spec is not None else "present"

