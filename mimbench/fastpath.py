"""The fast path: which precision, optimizer implementation and attention kernel a run uses.

Every loop (pre-training, linear probe, fine-tune, feature extraction, ``mimbench bench``) asks
this module instead of deciding for itself, so one rule holds everywhere:

* **Precision** (:func:`precision_choice`, and :func:`choose_precision` / :func:`resolve_amp` its precision
  alone): ``amp="auto"`` is a deterministic rule of the device, its capabilities and the workload
  (:class:`Workload`: model width, depth, tokens per image, training or inference), never a timing taken on
  the day, since precision changes the numbers a benchmark reports. On CUDA: bf16 autocast on GPUs of compute
  capability 8.0 or newer (Ampere on), fp16 autocast with a grad scaler on older ones (V100, T4), for every
  workload. On the CPU it depends on the CPU's kind (:func:`cpu_kind`, from the ``/proc/cpuinfo`` flags) and
  on the workload's matrix work per image ``width**2 * depth * tokens`` (:attr:`Workload.work`):

  ==================  ==================================  =====================================================
  CPU kind            auto                                measured (2 threads; ``mimbench bench``)
  ==================  ==================================  =====================================================
  ``no_bf16`` (AVX2   fp32 always                         bf16 is emulated: tiny MAE step 26 vs 361 img/s fp32
  only, no bf16                                           (14x slower)
  instructions)
  ``avx512_bf16``     bf16 from work >=                   tiny MAE step (192-d x 6, 17 visible tokens,
  (AMD EPYC,          :data:`AVX512_BF16_MIN_WORK`        batch 128) bf16 1.33x fp32; ViT-B/16 features
  no AMX)             (3.76 M), fp32 below                (batch 8) bf16 2.95x fp32
  ``amx`` (Intel      training: bf16 from work >=         bf16 / fp32 (explicit attention in bf16): training
  Xeon, ``amx_bf16``) :data:`AMX_TRAIN_MIN_WORK`          micro MAE step (64-d x 4, 0.28 M) 0.88x, 32-d x 4
                      (0.68 M); inference: from           fine-tune step (0.27 M) 1.05x, micro fine-tune step
                      :data:`AMX_INFERENCE_MIN_WORK`      (1.06 M) 1.37x, ``mae_tiny_fmnist`` step (128-d x 6,
                      (0.10 M); fp32 below                1.67 M) 1.42x (batch 64) / 1.61x (batch 128),
                                                          ViT-B/16 fine-tune step 2.4x; inference 32-d x 2
                                                          (0.03 M) 0.91x, 32-d x 4 at 65 tokens (0.27 M)
                                                          1.10x, micro (1.06 M) 1.48x, tiny (6.4 M) 2.58x,
                                                          ViT-B/16 3.3x
  ``arm_bf16``        bf16 from work >=                   -
  (Arm bf16, Apple)   :data:`ARM_BF16_MIN_WORK` (72 M)
                      (not measured: conservative)
  ==================  ==================================  =====================================================

  The thresholds: on ``avx512_bf16`` the smallest workload measured to gain (the tiny step; nothing smaller
  was measured there); on ``amx`` the geometric mean of the largest workload measured to lose and the smallest
  measured to gain, for training and for inference apart. The ``amx`` figures were measured with the fast
  path's attention under bf16 (timm's explicit path, "Attention" below); with the fused kernel bf16 lost on
  every small workload there (tiny step 0.60x, micro 0.41x), which is what the ``avx512_bf16`` row was measured
  with, so that row may be conservative below 3.76 M. Training counts the tokens the encoder sees (the visible
  ones of an MAE-style step). So on AVX-512-BF16 CPUs the demo's models run in fp32; on AMX CPUs the demo's
  pre-training (0.28 M) runs in fp32 and its fine-tune, feature extraction and attentive probes in bf16; ViT-B
  and larger run in bf16 wherever bf16 is native. A workload that is not given counts as small
  (fp32 on the CPU). ``MIMBENCH_CPU_BF16=1``/``0`` overrides the CPU rule (bf16 / fp32 for every workload).
  ``amp="bf16"`` forces bf16; ``"fp16"`` (with a grad scaler) and ``"none"`` (fp32) are taken as given.
  Every run record states the choice and the reason (``hardware.precision``, ``hardware.precision_reason``).
  ``mimbench bench MODE --amp calibrate`` times each candidate on the user's machine for that workload and
  records the result; it changes no default.
* **TF32** (:func:`configure_tf32`): an explicit choice made once per process by
  :func:`mimbench.dist.setup` - on for CUDA GPUs of compute capability 8.0 or newer (fp32 matrix
  products and convolutions on TF32 tensor cores), off when ``MIMBENCH_TF32=0``; run records keep
  what was chosen (``hardware.tf32_enabled``, :func:`tf32_enabled`).
* **Optimizer** (:func:`adamw_kwargs`): AdamW's fused kernel on CUDA, the multi-tensor
  (``foreach``) implementation on CPU. Both compute the same update as the per-tensor loop up to
  floating-point rounding.
* **Attention**: timm's ``Attention`` (every ViT/MAE/DDAE block of the project) calls
  ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, which timm does by default; with
  ``attn_drop > 0`` it passes the rate as ``dropout_p`` in training mode and 0 in eval mode, which
  is the same dropout on the attention probabilities as the explicit path.
  :func:`set_fused_attention` switches it off for the plain reference path of ``mimbench bench``.
  One exception on the fast path (:func:`attention_fused`, :func:`match_attention`): under bf16 on the CPU,
  timm's explicit path (``q @ k.T``, softmax, ``@ v``; autocast runs the products in bf16 and the softmax
  in fp32) replaces ``F.scaled_dot_product_attention``, whose CPU kernels are slow in bf16, above all its
  backward at the short sequences of an MAE step. Measured (Intel Xeon with AMX, 2 threads, idle,
  interleaved in one process; img/s, fused -> explicit, both bf16): ``mae_tiny_fmnist`` step (128-d x 6,
  batch 128) 381 -> 1,030 (fp32 fast path 639, plain fp32 615); micro step (64-d x 4, batch 64) 649 ->
  1,949 (fp32 2,153); ViT-B/16 fine-tune step (batch 8) 5.3 -> 5.8; ViT-B/16 features (batch 8) 20.6 ->
  24.6. ``torch.nn.attention.sdpa_kernel(MATH)`` instead gave 944 on the tiny step: the explicit path it
  is. Every record's ``precision_reason`` says so where it applies.
* **Compile** (:func:`maybe_compile`): ``torch.compile`` of a module in place (state-dict keys
  unchanged), static shapes - the number of visible tokens is fixed by the mask ratio. The training
  loop compiles the DDP wrapper, not the model inside it (:func:`mimbench.engine.wrap_for_training`).
"""
from __future__ import annotations

import math
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from mimbench.errors import MimbenchError
from mimbench.schema import AMP_CHOICES  # the allowed values of ``amp``, written once in the schema

__all__ = ["AMP_CHOICES", "cpu_supports_bf16", "cpuinfo_has_bf16", "choose_precision", "resolve_amp",
           "Workload", "PrecisionChoice", "precision_choice", "cpu_kind", "cpu_flags", "CPU_KINDS",
           "autocast_factory", "under_autocast", "amp_dtype", "configure_tf32", "tf32_enabled", "adamw_kwargs",
           "set_fused_attention", "attention_fused", "match_attention", "maybe_compile"]

#: /proc/cpuinfo flags of CPUs that compute bf16 natively (x86: AVX512-BF16, AMX; Arm: BF16, SVE-BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 instructions (read from ``/proc/cpuinfo`` flags on Linux;
    Apple silicon counts as capable; anything unreadable counts as not capable). The environment
    variable ``MIMBENCH_CPU_BF16=1``/``0`` overrides the detection."""
    forced = os.environ.get("MIMBENCH_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_flags_have_bf16()


def cpuinfo_has_bf16(text: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists a native-bf16 flag (:data:`BF16_CPU_FLAGS`)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return bool(BF16_CPU_FLAGS & set(value.split()))
    return False


@lru_cache(maxsize=1)
def _cpu_flags_have_bf16() -> bool:
    if platform.system() == "Darwin":
        return platform.machine() == "arm64"
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False


@dataclass(frozen=True)
class Workload:
    """What ``amp="auto"`` weighs on the CPU: the encoder's ``width`` (embedding dim) and ``depth`` (blocks), the
    ``tokens`` it processes per image (visible patches plus prefix tokens), and whether it trains."""

    width: int
    depth: int
    tokens: int
    train: bool

    @property
    def work(self) -> int:
        """Matrix work per image, ``width**2 * depth * tokens`` (proportional to a ViT's matmul FLOPs per image)."""
        return int(self.width) ** 2 * int(self.depth) * int(self.tokens)

    @classmethod
    def of_arch(cls, arch: Mapping, *, train: bool, img_size: int | None = None, keep: float = 1.0,
                prefix: int = 1) -> "Workload":
        """From an encoder's ``embed_dim``, ``depth``, ``img_size`` and ``patch_size`` (an encoder file's metadata or
        a model's ``encoder_arch()``): ``keep`` the share of patches the encoder sees (1 - mask ratio for an
        MAE-style step), ``prefix`` the class/register tokens."""
        size, patch = int(img_size or arch["img_size"]), int(arch["patch_size"])
        tokens = round((size // patch) ** 2 * float(keep)) + int(prefix)
        return cls(int(arch["embed_dim"]), int(arch["depth"]), max(tokens, 1), bool(train))

    def describe(self) -> str:
        mode = "training" if self.train else "inference"
        return f"{mode}, {self.width}-d x {self.depth}, {self.tokens} tokens: work {self.work / 1e6:.2f} M"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses (``"bf16"``, ``"fp16"`` or ``"none"`` = fp32) and why, in words."""

    precision: str
    reason: str


#: The workloads the CPU thresholds were measured on (module docstring). AMD AVX-512-BF16: the tiny MAE pre-training
#: step (192-d x 6, 64 patches at mask ratio 0.75 -> 16 visible + class token) and ViT-B/16 features at 224.
MEASURED_TINY_STEP = Workload(192, 6, 17, True)
MEASURED_VITB_FEATURES = Workload(768, 12, 197, False)
#: Intel AMX, bf16 with timm's explicit attention: the demo's micro MAE step (64-d x 4) and ``mae_tiny_fmnist``'s
#: step (128-d x 6), 17 tokens each; features of a 32-d x 2 encoder at 17 tokens and of a 32-d x 4 one at 65.
MEASURED_MICRO_STEP = Workload(64, 4, 17, True)
MEASURED_TINY_FMNIST_STEP = Workload(128, 6, 17, True)
MEASURED_NANO_FEATURES = Workload(32, 2, 17, False)
MEASURED_SMALL_FEATURES = Workload(32, 4, 65, False)
#: AMD EPYC, AVX-512 with bf16, no AMX: the tiny step is the smallest workload measured, bf16 1.33x fp32 there.
AVX512_BF16_MIN_WORK = MEASURED_TINY_STEP.work
#: Intel with AMX, training: the micro step loses (bf16 0.88x fp32), the tiny fmnist step gains (1.42-1.61x):
#: the geometric mean.
AMX_TRAIN_MIN_WORK = int(math.sqrt(MEASURED_MICRO_STEP.work * MEASURED_TINY_FMNIST_STEP.work))
#: Intel with AMX, inference: the 32-d x 2 features lose (0.91x), the 32-d x 4 ones at 65 tokens gain (1.10x).
AMX_INFERENCE_MIN_WORK = int(math.sqrt(MEASURED_NANO_FEATURES.work * MEASURED_SMALL_FEATURES.work))
#: Arm bf16 (not measured): the conservative threshold the AMX rule had before timm's explicit attention replaced
#: the fused kernel under CPU bf16 - the geometric mean of the tiny step and ViT-B features.
ARM_BF16_MIN_WORK = int(math.sqrt(MEASURED_TINY_STEP.work * MEASURED_VITB_FEATURES.work))
#: Minimum work per image for bf16 under "auto", per CPU kind and mode (None: never bf16).
CPU_KINDS: dict[str, dict[str, int | None]] = {
    "amx": {"train": AMX_TRAIN_MIN_WORK, "inference": AMX_INFERENCE_MIN_WORK},
    "avx512_bf16": {"train": AVX512_BF16_MIN_WORK, "inference": AVX512_BF16_MIN_WORK},
    "arm_bf16": {"train": ARM_BF16_MIN_WORK, "inference": ARM_BF16_MIN_WORK},
    "no_bf16": {"train": None, "inference": None},
}


def cpu_flags() -> frozenset[str]:
    """The CPU's ``/proc/cpuinfo`` flags (empty where unreadable)."""
    return _cpu_flag_set()


@lru_cache(maxsize=1)
def _cpu_flag_set() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_kind(flags: frozenset[str] | None = None) -> str:
    """The CPU's kind for the precision rule (:data:`CPU_KINDS`): ``amx`` (``amx_bf16``), ``avx512_bf16``
    (without AMX), ``arm_bf16`` (Arm ``bf16``/``sve_bf16``, Apple silicon) or ``no_bf16``."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if flags & {"bf16", "sve_bf16"} or (platform.system() == "Darwin" and platform.machine() == "arm64"):
        return "arm_bf16"
    return "no_bf16"


def precision_choice(amp: str, device: torch.device | str, workload: Workload | None = None) -> PrecisionChoice:
    """The precision a run of ``workload`` on ``device`` uses for setting ``amp``, and why (module docstring);
    where bf16 runs on the CPU the reason also names the attention kernel (:func:`attention_fused`)."""
    choice = _precision_choice(amp, device, workload)
    if attention_fused(choice.precision, device):
        return choice
    return PrecisionChoice(choice.precision, f"{choice.reason}; {EXPLICIT_ATTENTION}")


def _precision_choice(amp: str, device: torch.device | str, workload: Workload | None) -> PrecisionChoice:
    if amp not in AMP_CHOICES:
        raise MimbenchError(f"amp={amp!r} is not one of {', '.join(AMP_CHOICES)}.",
                            "Set amp to auto (bf16 where it is faster), bf16, fp16 or none (fp32).")
    device = torch.device(device)
    if amp != "auto":
        return PrecisionChoice(amp, f"amp={amp} as set")
    if device.type == "cuda":
        capability = _cuda_capability(device)
        if capability is None or capability >= (8, 0):
            return PrecisionChoice("bf16", "auto: CUDA GPU with bf16 tensor cores (compute capability >= 8.0)")
        return PrecisionChoice("fp16", f"auto: CUDA GPU of compute capability {capability[0]}.{capability[1]} "
                                       "(no bf16): fp16 with a grad scaler")
    if device.type != "cpu":
        return PrecisionChoice("none", f"auto: fp32 on {device.type}")
    return _cpu_choice(workload)


def _cpu_choice(workload: Workload | None) -> PrecisionChoice:
    forced = os.environ.get("MIMBENCH_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return PrecisionChoice("bf16" if forced == "1" else "none", f"auto: MIMBENCH_CPU_BF16={forced}")
    kind = cpu_kind()
    if CPU_KINDS[kind]["train"] is None:
        return PrecisionChoice("none", "auto: CPU without bf16 instructions (bf16 would be emulated): fp32")
    if workload is None:
        return PrecisionChoice("none", f"auto: CPU kind {kind}, workload not given: fp32")
    threshold = CPU_KINDS[kind]["train" if workload.train else "inference"]
    precision = "bf16" if workload.work >= threshold else "none"
    relation = ">=" if precision == "bf16" else "<"
    return PrecisionChoice(precision, f"auto: CPU kind {kind}, {workload.describe()} {relation} "
                                      f"{threshold / 1e6:.2f} M: {'bf16' if precision == 'bf16' else 'fp32'}")


def choose_precision(amp: str, device: torch.device | str, workload: Workload | None = None) -> str:
    """The precision a run of ``workload`` on ``device`` uses for setting ``amp``: ``"bf16"``, ``"fp16"`` or
    ``"none"`` (fp32); :func:`precision_choice` with its reason."""
    return precision_choice(amp, device, workload).precision


#: The name every caller used before the CUDA rule followed the GPU's capability.
resolve_amp = choose_precision


def _cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of the CUDA ``device``; None where no CUDA device can be asked (planning on a
    machine without one: the rule of current GPUs, bf16, applies)."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device.index if device.index is not None else 0))


def configure_tf32(device: torch.device | str) -> bool:
    """Turn TF32 matrix products and convolutions on or off for this process and return the choice:
    on for CUDA devices of compute capability 8.0 or newer unless ``MIMBENCH_TF32=0``; off otherwise."""
    device = torch.device(device)
    capability = _cuda_capability(device) if device.type == "cuda" else None
    enabled = capability is not None and capability >= (8, 0) and os.environ.get("MIMBENCH_TF32", "").strip() != "0"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def tf32_enabled() -> bool:
    """Whether this process lets fp32 matrix products use TF32 (what :func:`configure_tf32` chose)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def amp_dtype(precision: str) -> torch.dtype:
    """Compute dtype of a resolved precision (``resolve_amp``'s result)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[precision]


def autocast_factory(precision: str, device: torch.device | str):
    """A zero-argument callable returning the autocast context for a *resolved* precision
    (a no-op context for ``"none"``)."""
    device = torch.device(device)
    if precision == "none":
        return nullcontext
    dtype = amp_dtype(precision)
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def under_autocast(fn, precision: str, device: torch.device | str):
    """``fn`` wrapped to run under the autocast of a *resolved* ``precision`` (evaluation forwards: scored in
    the precision the record states)."""
    autocast = autocast_factory(precision, device)

    def wrapped(*args, **kwargs):
        with autocast():
            return fn(*args, **kwargs)

    return wrapped


def adamw_kwargs(device: torch.device | str) -> dict:
    """Implementation switches for ``torch.optim.AdamW`` on ``device``: fused on CUDA, foreach on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"fused": True}
    return {"foreach": True}


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch every timm attention module in ``model`` (anything with a ``fused_attn`` flag) to
    ``F.scaled_dot_product_attention`` (True) or the explicit softmax path (False); returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "fused_attn"), bool):
            module.fused_attn = bool(enabled)
            count += 1
    return count


def attention_fused(precision: str, device: torch.device | str) -> bool:
    """Whether the fast path runs timm's attention through ``F.scaled_dot_product_attention`` for
    ``precision`` on ``device``: everywhere but bf16 on the CPU (module docstring, "Attention")."""
    return not (torch.device(device).type == "cpu" and precision == "bf16")


def match_attention(model: nn.Module, precision: str, device: torch.device | str) -> bool:
    """Set ``model``'s timm attention to the fast path's kernel for ``precision`` on ``device``
    (:func:`attention_fused`); returns whether it is fused."""
    fused = attention_fused(precision, device)
    set_fused_attention(model, fused)
    return fused


#: What a record's precision reason adds where :func:`attention_fused` is False.
EXPLICIT_ATTENTION = "attention: timm's explicit path (torch's CPU fused attention is slower in bf16)"


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model.compile(dynamic=False)`` in place when ``enabled`` (parameters and state-dict keys stay
    as they are, so checkpoints and encoder export are unaffected); returns ``model``."""
    if enabled:
        if not hasattr(torch, "compile"):
            raise MimbenchError("runtime.compile=True needs torch.compile (PyTorch >= 2.0).",
                                "Upgrade PyTorch or set runtime.compile=False.")
        model.compile(dynamic=False)
    return model
