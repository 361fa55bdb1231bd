"""Config schemas: the keys each kind of config may hold, their types and their allowed ranges.

A config file or a ``--set`` override with an unknown key, a value of the wrong type or a value out of
range is refused by :func:`validate` before any work starts, with the key, the value, where it came from
and what is allowed (and the closest known key for a typo). Kinds: ``pretrain``, ``linear``,
``finetune``, ``knn``, ``segment``, ``lowshot``, ``attentive`` and ``robustness``.

Sections are *closed* (every key must be known) except where a schema says otherwise: a pre-training
``model`` section passes its keys to the model constructor, which refuses unknown ones itself, and a
segmentation config is an mmsegmentation config whose top level holds helper variables of any name, so
only the keys mimbench reads there are checked (crop size, class count, iterations, batch size,
checkpoint interval, seed). Numbers: an ``int`` field takes integers only (not ``True``/``False``), a
``float`` field integers or floats; both must be finite.

Defaults: every leaf carries its default (``INT_GE1(20)``: an integer >= 1, 20 when left out), except the
keys a section lists as ``required``, which every config sets. :func:`mimbench.config.load_config` fills
what a config leaves out (:func:`missing_defaults`), so the code reads ``cfg.runtime.log_every`` directly and
this module is the one place a default is written. A segmentation config is mmsegmentation's and keeps
mmseg's defaults: nothing is filled in.

Allowed values (``AMP_CHOICES``, ``LINEAR_MODES`` ...) are written here once; the modules that implement
them and the CLI's typed choices read them from here.

Every training kind (pre-training, linear probe, fine-tuning) has the same ``runtime`` section
(:data:`RUNTIME_KEYS`: seed, precision, checkpoint and log intervals, progress bar, TensorBoard, trackers); k-NN has
its seed and precision; pre-training adds ``compile`` and ``mask_ratio``.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from mimbench.errors import MimbenchError

__all__ = ["Num", "Choice", "Flag", "Text", "Seq", "Section", "REQUIRED", "SCHEMAS", "KINDS", "FILLED_KINDS",
           "AMP", "AMP_CHOICES", "RUNTIME_KEYS", "EVAL_DATA", "LINEAR_MODES", "LINEAR_OPTIMIZERS", "AUGMENT_MODES", "MIXUP_MODES", "ERASE_MODES",
           "TRACKERS", "POOLS", "LAYERS_SYNTAX", "SELECTION_ON", "Layers", "layer_spec", "LOWSHOT_CLASSIFIERS",
           "ATTENTIVE_PRESETS", "ATTENTIVE_OPTIMIZERS", "ATTENTIVE_TOKENS", "ATTENTIVE_AUGMENTS",
           "TRAINABLE_BLOCKS_WORDS", "Blocks", "ROBUSTNESS_SETS", "V2_VARIANTS",
           "validate", "knows_key", "spec_of", "missing_defaults"]


class _Required:
    """The default of a key every config must set (listed in its section's ``required``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


class _Leaf:
    """A leaf called with a value is the same leaf with that default: ``INT_GE1(20)`` is "an integer >= 1,
    20 when the config leaves it out"."""

    default: Any = REQUIRED

    def __call__(self, default):
        return replace(self, default=default)

    @property
    def has_default(self) -> bool:
        return self.default is not REQUIRED


@dataclass(frozen=True)
class Num(_Leaf):
    """A number: ``kind`` int or float, within [lo, hi] (``lo_open``/``hi_open`` exclude the ends)."""

    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: bool = False
    default: Any = REQUIRED

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
class Choice(_Leaf):
    values: tuple
    none: bool = False
    default: Any = REQUIRED

    def problem(self, v) -> str | None:
        if v is None and self.none:
            return None
        return None if any(v == c and type(v) is type(c) for c in self.values) else "is not one of the choices"

    def allowed(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.values) + (" or None" if self.none else "")


@dataclass(frozen=True)
class Flag(_Leaf):
    default: Any = REQUIRED

    def problem(self, v) -> str | None:
        return None if isinstance(v, bool) else f"is a {type(v).__name__}"

    def allowed(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Text(_Leaf):
    none: bool = False
    default: Any = REQUIRED

    def problem(self, v) -> str | None:
        if v is None:
            return None if self.none else "must be set"
        return None if isinstance(v, str) else f"is a {type(v).__name__}"

    def allowed(self) -> str:
        return "a string" + (" or None" if self.none else "")


def layer_spec(value) -> tuple[str, tuple[int, ...]] | None:
    """``value`` of a ``layers`` key (:data:`LAYERS_SYNTAX`) as ``(form, numbers)``: ``("last", ())``,
    ``("block", (i,))``, ``("concat", (n,))``, ``("mean", (i, j, ...))``, ``("all", ())``; None when malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "block", (value,)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in ("last", "all"):
        return text, ()
    if re.fullmatch(r"-?\d+", text):
        return "block", (int(text),)
    match = re.fullmatch(r"(concat):(\d+)|(mean):(-?\d+(?:,-?\d+)*)", text.replace(" ", ""))
    if match is None:
        return None
    if match.group(1):
        return ("concat", (int(match.group(2)),)) if int(match.group(2)) >= 1 else None
    return "mean", tuple(int(i) for i in match.group(4).split(","))


@dataclass(frozen=True)
class Layers(_Leaf):
    """Which blocks a probe reads (:func:`layer_spec`)."""

    default: Any = REQUIRED

    def problem(self, v) -> str | None:
        return None if layer_spec(v) is not None else "is not a layer selection"

    def allowed(self) -> str:
        return LAYERS_SYNTAX


@dataclass(frozen=True)
class Blocks(_Leaf):
    """How many of the last blocks train: an integer K >= 0, or one of ``words`` (:data:`TRAINABLE_BLOCKS_WORDS`)."""

    words: tuple
    default: Any = REQUIRED

    def problem(self, v) -> str | None:
        if isinstance(v, str):
            return None if v in self.words else "is not one of the words"
        if isinstance(v, bool) or not isinstance(v, int):
            return f"is a {type(v).__name__}"
        return None if v >= 0 else "is out of range"

    def allowed(self) -> str:
        return "an integer K >= 0 (the last K blocks) or one of " + ", ".join(repr(w) for w in self.words)


@dataclass(frozen=True)
class Seq(_Leaf):
    """A list or tuple of ``item``s (exactly ``length`` of them when given)."""

    item: Any
    length: int | None = None
    none: bool = False
    default: Any = REQUIRED

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
    """A dict of known keys; ``open`` sections also accept keys they do not list.

    A key of ``required`` has no default (every config sets it); every other key has one (a leaf's
    ``default``, a section's the defaults of its keys), which :func:`missing_defaults` supplies.
    """

    keys: Mapping[str, Any]
    open: bool = False
    required: tuple = ()
    checks: tuple = field(default=())  # (predicate(dict) -> bool, message) pairs across keys

    def problem(self, v) -> str | None:
        return None if isinstance(v, Mapping) else f"is a {type(v).__name__}, not a section (dict)"

    def allowed(self) -> str:
        return "a dict"


# ---------------------------------------------------------------------------- allowed values
# Each tuple is the one place its values are written: the modules that implement them and the CLI read them here.
AMP_CHOICES = ("auto", "bf16", "fp16", "none")    # mimbench.fastpath.resolve_amp
LINEAR_MODES = ("protocol", "cached")             # mimbench.evals.linear
LINEAR_OPTIMIZERS = ("lars", "adam")              # mimbench.evals.linear.build_optimizer
AUGMENT_MODES = ("timm", "tensor")                # mimbench.evals.finetune
MIXUP_MODES = ("batch", "pair", "elem")           # timm Mixup
ERASE_MODES = ("const", "rand", "pixel")          # timm RandomErasing
TRACKERS = ("tensorboard", "wandb", "mlflow")     # mimbench.trackers: mmengine's vis backends
LOWSHOT_CLASSIFIERS = ("msn-logreg",)             # mimbench.evals.lowshot
#: Feature poolings (mimbench.evals.features.pool_tokens): cls = class token, avg = mean of the patch tokens
#: (class and register tokens left out), cls+avg = both; auto (or a linear probe's unset pool) = the encoder
#: family's pooling (mimbench.evals.features.resolve_pool: the class token, or avg for an encoder without one or
#: whose metadata says global_pool=avg; the Eva family per task: DINOv3 k-NN cls, linear cls+avg, EVA-02 avg).
POOLS = ("auto", "cls", "avg", "cls+avg")
#: The ``layers`` values of a probe (mimbench.evals.features.resolve_layers): the syntax, as errors show it.
LAYERS_SYNTAX = ("'last' (the last block), a block index (7; -2 counts from the end), 'concat:N' (the last N "
                 "blocks' features concatenated, as DINOv2's last-4), 'mean:I,J,...' (the mean of blocks I, J, ..., "
                 "as AIM), or 'all' (every block, one head each)")
#: Where a protocol's selection (an epoch, a hyper-parameter, a block) is made: a held-out part of the training
#: set (the default), or the validation split (the published way, optimistic).
SELECTION_ON = ("train-holdout", "val")
ATTENTIVE_PRESETS = ("cae", "ep", "vjepa")        # mimbench.evals.attentive: the attention-pooling heads
ATTENTIVE_OPTIMIZERS = ("sgd", "lars", "adamw")   # mimbench.evals.attentive.build_optimizer
ATTENTIVE_TOKENS = ("all", "patch")               # tokens the head attends to: all, or without class/registers
ATTENTIVE_AUGMENTS = ("rrc_flip", "timm")         # RandomResizedCrop + flip, or timm create_transform
#: ``finetune.trainable_blocks`` besides an integer K (mimbench.evals.finetune.freeze_for_partial_finetune): "all" =
#: full fine-tuning, "mlp" = only the last block's MLP half (MAE Figure 9's half-block point).
TRAINABLE_BLOCKS_WORDS = ("all", "mlp")
#: mimbench.evals.robustness: ImageNet-C, -A, -R, -Sketch, ImageNetV2 (MAE Table 13) and the demo's Fashion-MNIST-C.
ROBUSTNESS_SETS = ("in-c", "in-a", "in-r", "sketch", "v2", "fmnist-c")
V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")  # ImageNetV2's three test sets

# ---------------------------------------------------------------------------- leaves and shared sections
INT_GE0, INT_GE1 = Num(int, lo=0), Num(int, lo=1)
FRACTION = Num(float, 0.0, 1.0)
SIZE_OR_NONE = Num(int, lo=1, none=True)
LR = Num(float, lo=0, lo_open=True, none=True)
#: The precision of a run: "auto" = bf16 where the hardware has it (CUDA, bf16-capable CPUs), else fp32.
AMP = Choice(AMP_CHOICES)("auto")
BETAS = Seq(Num(float, 0.0, 1.0, hi_open=True), length=2)
#: Broken image files a split may skip; None: the folder loader's own limit (mimbench.data.folders).
MAX_BAD = Num(float, 0.0, 1.0, none=True)(None)
#: The loop settings every training run shares (pre-training, linear probe, fine-tuning).
RUNTIME_KEYS = {"seed": INT_GE0(0), "amp": AMP, "ckpt_every": INT_GE0(0), "ckpt_every_steps": INT_GE0(0),
                "log_every": INT_GE1(20), "progress": Flag()(True), "tensorboard": Flag()(False),
                "trackers": Seq(Choice(TRACKERS))([])}  # tensorboard=True adds "tensorboard" to the trackers


def schedule(min_lr: float) -> Section:
    """``schedule``: epochs and warm-up (every config sets them), cosine floor ``min_lr`` unless set."""
    return Section({"epochs": INT_GE1, "warmup_epochs": Num(float, lo=0), "min_lr": Num(float, lo=0)(min_lr)},
                   required=("epochs", "warmup_epochs"),
                   checks=((lambda s: s["warmup_epochs"] < s["epochs"],
                            "schedule.warmup_epochs must be below schedule.epochs"),))


#: Micro-batch (required), effective batch (None: batch_size x accum_iter x processes), accumulation.
BATCH = {"batch_size": INT_GE1, "eff_batch_size": SIZE_OR_NONE(None), "accum_iter": INT_GE1(1)}


#: JPEG decode-time downscaling (PIL ``Image.draft``, mimbench.data.draft_size): off by default, as the published
#: protocols decode in full; BENCHMARKS.md has its speed (none at 224 on ImageNet's usual 500x375, 1.32x decode on
#: 1024x768) and accuracy (unchanged within noise at demo scale); an evaluation with it on lists it as a deviation.
#: Evaluations: top-level ``decode_draft`` beside ``img_size``; pre-training: ``data.decode_draft``.
DECODE_DRAFT = Flag()(False)
EVAL_DATA = Section({"limit_train": SIZE_OR_NONE(None), "limit_val": SIZE_OR_NONE(None), "max_bad_fraction": MAX_BAD,
                     "num_workers": INT_GE0(0)})
HAS_LR = ((lambda o: o.get("lr") is not None or o.get("blr") is not None, "optim needs lr or blr"),)
#: Keys every evaluation config may set at the top level.
EVAL_COMMON = {"img_size": SIZE_OR_NONE(None), "decode_draft": DECODE_DRAFT, "data": EVAL_DATA,
               "deviations": Seq(Text())([])}

SCHEMAS: dict[str, Section] = {
    "pretrain": Section({
        "technique": Text(none=True)(None),  # None: the model's registered technique
        "model": Section({"name": Text()}, open=True, required=("name",)),
        "data": Section({"img_size": INT_GE1(224), "num_workers": INT_GE0(0), "limit": SIZE_OR_NONE(None),
                         "max_bad_fraction": MAX_BAD, "decode_draft": DECODE_DRAFT}),
        "optim": Section({"blr": Num(float, lo=0, lo_open=True), "weight_decay": Num(float, lo=0)(0.05),
                          "betas": BETAS((0.9, 0.95)), "clip_grad": Num(float, lo=0, lo_open=True, none=True)(None),
                          **BATCH},
                         required=("blr", "batch_size")),
        "schedule": schedule(min_lr=0.0),
        "runtime": Section({**RUNTIME_KEYS, "compile": Flag()(False),
                            "mask_ratio": Num(float, 0.0, 1.0, lo_open=True, hi_open=True, none=True)(0.75)}),
    }, required=("model", "optim", "schedule")),
    "linear": Section({
        **EVAL_COMMON, "mode": Choice(LINEAR_MODES)("protocol"), "runtime": Section(RUNTIME_KEYS),
        "optim": Section({"name": Choice(LINEAR_OPTIMIZERS)("lars"), "blr": LR(None), "lr": LR(None),
                          "momentum": FRACTION(0.9), "trust_coeff": Num(float, lo=0)(0.001),
                          "weight_decay": Num(float, lo=0)(0.0), "betas": BETAS((0.9, 0.999)), **BATCH},
                         required=("batch_size",), checks=HAS_LR),
        "schedule": schedule(min_lr=0.0),
        "augment": Section({"scale": Seq(Num(float, 0.0, 1.0, lo_open=True), length=2)((0.08, 1.0))}),
        "cache_dir": Text(none=True)(None), "feature_batch_size": INT_GE1(256),
        # The blocks and tokens the head reads (mimbench.evals.features): pool None = the encoder family's pooling.
        "layers": Layers()("last"), "pool": Choice(POOLS, none=True)(None),
        # What the block sweep (layers="all") selects best_block on: a seeded hold-out of the training set (its
        # `holdout` fraction, never trained on), or the val split as published selections do.
        "selection": Section({"on": Choice(SELECTION_ON)("train-holdout"),
                              "holdout": Num(float, 0.0, 1.0, lo_open=True, hi_open=True)(0.1)}),
    }, required=("optim", "schedule")),
    "finetune": Section({
        **EVAL_COMMON, "runtime": Section(RUNTIME_KEYS), "clip_grad": Num(float, lo=0, lo_open=True, none=True)(None),
        "model": Section({"drop_path": Num(float, 0.0, 1.0, hi_open=True), "head_init_std": Num(float, lo=0)(2e-5)},
                         required=("drop_path",)),
        "optim": Section({"blr": LR(None), "lr": LR(None), "weight_decay": Num(float, lo=0),
                          "layer_decay": Num(float, 0.0, 1.0, lo_open=True), "betas": BETAS((0.9, 0.999)),
                          **BATCH},
                         required=("batch_size", "weight_decay", "layer_decay"), checks=HAS_LR),
        "schedule": schedule(min_lr=1e-6),
        "mixup": Section({"mixup": Num(float, lo=0), "cutmix": Num(float, lo=0),
                          "smoothing": Num(float, 0.0, 1.0, hi_open=True), "prob": FRACTION(1.0),
                          "switch_prob": FRACTION(0.5), "mode": Choice(MIXUP_MODES)("batch")},
                         required=("mixup", "cutmix", "smoothing")),
        "augment": Section({"mode": Choice(AUGMENT_MODES)("timm"),
                            "auto_augment": Text(none=True)("rand-m9-mstd0.5-inc1"), "re_prob": FRACTION(0.25),
                            "re_mode": Choice(ERASE_MODES)("pixel"), "re_count": INT_GE1(1)}),
        # Partial fine-tuning (MAE Figure 9): what trains besides the final norm and the head.
        "finetune": Section({"trainable_blocks": Blocks(TRAINABLE_BLOCKS_WORDS)("all")}),
    }, required=("model", "optim", "schedule", "mixup")),
    "knn": Section({
        **EVAL_COMMON, "runtime": Section({k: RUNTIME_KEYS[k] for k in ("seed", "amp")}),  # no training loop
        "knn": Section({"k": INT_GE1(20), "temperature": Num(float, lo=0, lo_open=True)(0.07)}),
        "batch_size": INT_GE1(256), "cache_dir": Text(none=True)(None),
    }),
    "lowshot": Section({
        **EVAL_COMMON, "runtime": Section({k: RUNTIME_KEYS[k] for k in ("seed", "amp")}),  # no training loop
        # The training subset: split files (one run each) or `shots` images per class drawn with `seeds` seeds.
        "lowshot": Section({"split_files": Seq(Text())([]), "shots": Num(int, lo=1, none=True)(None),
                            "seeds": INT_GE1(3)}),
        # MSN's logistic regression (facebookresearch/msn logistic_eval.py): L2 penalty lambd / N, tol, epochs.
        "classifier": Section({"name": Choice(LOWSHOT_CLASSIFIERS)("msn-logreg"),
                               "lambd": Num(float, lo=0, lo_open=True)(0.00025),
                               "tol": Num(float, lo=0, lo_open=True)(1e-3), "max_iter": INT_GE1(300)}),
        "batch_size": INT_GE1(256), "cache_dir": Text(none=True)(None),
    }),
    "attentive": Section({
        **EVAL_COMMON, "mode": Choice(LINEAR_MODES)("protocol"), "runtime": Section(RUNTIME_KEYS),
        "clip_grad": Num(float, lo=0, lo_open=True, none=True)(None),
        "head": Section({"preset": Choice(ATTENTIVE_PRESETS), "num_queries": INT_GE1(1),
                         "num_heads": SIZE_OR_NONE(None),  # None: the encoder's own head count
                         "mlp_ratio": Num(float, lo=0)(4.0), "tokens": Choice(ATTENTIVE_TOKENS)("patch"),
                         "final_norm": Flag()(True)},
                        required=("preset",)),
        "optim": Section({"name": Choice(ATTENTIVE_OPTIMIZERS), "blr": LR(None), "lr": LR(None),
                          "momentum": FRACTION(0.9), "trust_coeff": Num(float, lo=0)(0.001),
                          "weight_decay": Num(float, lo=0)(0.0),
                          "final_weight_decay": Num(float, lo=0, none=True)(None),  # None: constant
                          "betas": BETAS((0.9, 0.999)), **BATCH},
                         required=("name", "batch_size"), checks=HAS_LR),
        "schedule": schedule(min_lr=0.0),
        "augment": Section({"mode": Choice(ATTENTIVE_AUGMENTS)("rrc_flip"),
                            "scale": Seq(Num(float, 0.0, 1.0, lo_open=True), length=2)((0.08, 1.0)),
                            "auto_augment": Text(none=True)(None), "re_prob": FRACTION(0.0),
                            "re_mode": Choice(ERASE_MODES)("pixel"), "re_count": INT_GE1(1)}),
        "feature_batch_size": INT_GE1(256),
        "layers": Layers()("last"),  # the block whose tokens the head attends to: "last" or a block index
        # Whether the run reports the best epoch (as Efficient Probing does) instead of the last, and what it selects
        # that epoch on: a seeded hold-out of the training set (its `holdout` fraction, never trained on) or val.
        "selection": Section({"best_epoch": Flag()(False), "on": Choice(SELECTION_ON)("train-holdout"),
                              "holdout": Num(float, 0.0, 1.0, lo_open=True, hi_open=True)(0.1)}),
    }, required=("head", "optim", "schedule")),
    "robustness": Section({
        **EVAL_COMMON, "runtime": Section({k: RUNTIME_KEYS[k] for k in ("seed", "amp")}),  # inference only
        "sets": Seq(Choice(ROBUSTNESS_SETS))(["in-c", "in-a", "in-r", "sketch"]),  # MAE Table 13's rows
        "v2_variant": Choice(V2_VARIANTS)("matched-frequency"),
        # class folders: a part of a set's classes is refused unless allowed (then recorded as a deviation)
        "allow_subset": Flag()(False),
        "batch_size": INT_GE1(256),
    }),
    # An mmsegmentation config: only the keys mimbench reads are checked, and mmseg's own defaults apply (no
    # key is filled in).
    "segment": Section({
        "crop_size": Seq(INT_GE1, length=2), "num_classes": INT_GE1, "max_iters": INT_GE1,
        "train_cfg": Section({"max_iters": INT_GE1, "val_interval": INT_GE1}, open=True),
        "train_dataloader": Section({"batch_size": INT_GE1, "num_workers": INT_GE0}, open=True),
        "default_hooks": Section({"checkpoint": Section({"interval": INT_GE1, "max_keep_ckpts": Num(int)}, open=True)},
                                 open=True),
        "randomness": Section({"seed": Num(int, lo=0, none=True)}, open=True),
        "runtime": Section({"trackers": RUNTIME_KEYS["trackers"]}),  # mimbench's, not mmseg's: `--tracker`
    }, open=True, required=("model", "train_dataloader", "test_dataloader", "test_evaluator", "optim_wrapper",
                            "train_cfg", "crop_size")),
}
KINDS = tuple(SCHEMAS)
#: Kinds whose missing keys :func:`missing_defaults` fills (a segmentation config keeps mmseg's defaults).
FILLED_KINDS = ("pretrain", "linear", "finetune", "knn", "lowshot", "attentive", "robustness")


def _section(kind: str) -> Section:
    if kind not in SCHEMAS:
        raise MimbenchError(f"Unknown config kind {kind!r}.", f"Use one of: {', '.join(KINDS)}.")
    return SCHEMAS[kind]


def spec_of(kind: str, dotted: str):
    """The schema entry (a leaf or a :class:`Section`) of key ``dotted`` of ``kind``; KeyError when unlisted."""
    node: Any = _section(kind)
    for part in dotted.split("."):
        if not isinstance(node, Section) or part not in node.keys:
            raise KeyError(dotted)
        node = node.keys[part]
    return node


def missing_defaults(cfg: Mapping, kind: str) -> dict[str, Any]:
    """``{dotted key: default}`` for every key with a default that ``cfg`` leaves out (inside a section it
    leaves out too); empty for a kind outside :data:`FILLED_KINDS`. Each default is a fresh copy."""
    found: dict[str, Any] = {}

    def walk(node: Mapping, spec: Section, prefix: str) -> None:
        for key, sub in spec.keys.items():
            if isinstance(sub, Section):
                value = node[key] if key in node else {}
                if isinstance(value, Mapping):
                    walk(value, sub, f"{prefix}{key}.")
            elif key not in node and sub.has_default:
                found[prefix + key] = copy.deepcopy(sub.default)

    if kind in FILLED_KINDS:
        walk(cfg, _section(kind), "")
    return found


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

