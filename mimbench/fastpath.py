"""The fast path: which precision, optimizer implementation and attention kernel a run uses.

Every loop (pre-training, linear probe, fine-tune, feature extraction, ``mimbench bench``) asks
this module instead of deciding for itself, so one rule holds everywhere:

* **Precision** (:func:`resolve_amp`): ``amp="auto"`` means bf16 autocast on CUDA and on CPUs
  with native bf16 arithmetic (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``/``sve_bf16``
  flags), fp32 elsewhere. On a CPU without those instructions bf16 is emulated and several times
  *slower* than fp32, so "auto" never picks it there; ``amp="bf16"`` still forces it. ``"fp16"``
  (CUDA, with a grad scaler) and ``"none"`` (fp32) are taken as given.
* **Optimizer** (:func:`adamw_kwargs`): AdamW's fused kernel on CUDA, the multi-tensor
  (``foreach``) implementation on CPU. Both compute the same update as the per-tensor loop up to
  floating-point rounding.
* **Attention**: timm's ``Attention`` (every ViT/MAE/DDAE block of the project) calls
  ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, which timm does by default; with
  ``attn_drop > 0`` it passes the rate as ``dropout_p`` in training mode and 0 in eval mode, which
  is the same dropout on the attention probabilities as the explicit path.
  :func:`set_fused_attention` switches it off for the plain reference path of ``mimbench bench``.
* **Compile** (:func:`maybe_compile`): ``torch.compile`` of a module in place (state-dict keys
  unchanged), static shapes - the number of visible tokens is fixed by the mask ratio.
"""
from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mimbench.errors import MimbenchError
from mimbench.schema import AMP_CHOICES  # the allowed values of ``amp``, written once in the schema

__all__ = ["AMP_CHOICES", "cpu_supports_bf16", "cpuinfo_has_bf16", "resolve_amp", "autocast_factory", "amp_dtype",
           "adamw_kwargs", "set_fused_attention", "maybe_compile"]

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


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """The precision a run on ``device`` uses for setting ``amp``: ``"bf16"``, ``"fp16"`` or ``"none"``
    (fp32). ``"auto"`` -> bf16 on CUDA and on bf16-capable CPUs, else fp32 (module docstring)."""
    if amp not in AMP_CHOICES:
        raise MimbenchError(f"amp={amp!r} is not one of {', '.join(AMP_CHOICES)}.",
                            "Set amp to auto (bf16 where the hardware has it), bf16, fp16 or none (fp32).")
    device = torch.device(device)
    if amp == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()):
            return "bf16"
        return "none"
    return amp


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


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model.compile(dynamic=False)`` in place when ``enabled`` (parameters and state-dict keys stay
    as they are, so checkpoints and encoder export are unaffected); returns ``model``."""
    if enabled:
        if not hasattr(torch, "compile"):
            raise MimbenchError("runtime.compile=True needs torch.compile (PyTorch >= 2.0).",
                                "Upgrade PyTorch or set runtime.compile=False.")
        model.compile(dynamic=False)
    return model
