"""The fast path: which precision, optimizer implementation and attention kernel a run uses.

Every loop (pre-training, linear probe, fine-tune, feature extraction, ``mimbench bench``) asks
this module instead of deciding for itself, so one rule holds everywhere:

* **Precision** (:func:`choose_precision`, also named :func:`resolve_amp`): ``amp="auto"`` means,
  on CUDA, bf16 autocast on GPUs of compute capability 8.0 or newer (Ampere on) and fp16 autocast with
  a grad scaler on older ones (V100, T4: no bf16 arithmetic); on the CPU, bf16 on CPUs with native
  bf16 arithmetic (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``/``sve_bf16`` flags) and fp32
  elsewhere. On a CPU without those instructions bf16 is emulated and several times *slower* than
  fp32, so "auto" never picks it there; ``amp="bf16"`` still forces it. ``"fp16"`` (with a grad
  scaler) and ``"none"`` (fp32) are taken as given.
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
* **Compile** (:func:`maybe_compile`): ``torch.compile`` of a module in place (state-dict keys
  unchanged), static shapes - the number of visible tokens is fixed by the mask ratio. The training
  loop compiles the DDP wrapper, not the model inside it (:func:`mimbench.engine.wrap_for_training`).
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

__all__ = ["AMP_CHOICES", "cpu_supports_bf16", "cpuinfo_has_bf16", "choose_precision", "resolve_amp",
           "autocast_factory", "under_autocast", "amp_dtype", "configure_tf32", "tf32_enabled", "adamw_kwargs",
           "set_fused_attention", "maybe_compile"]

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


def choose_precision(amp: str, device: torch.device | str) -> str:
    """The precision a run on ``device`` uses for setting ``amp``: ``"bf16"``, ``"fp16"`` or ``"none"``
    (fp32). ``"auto"``: on CUDA bf16 from compute capability 8.0 on, fp16 (with a grad scaler) below;
    on the CPU bf16 where it is native, else fp32 (module docstring)."""
    if amp not in AMP_CHOICES:
        raise MimbenchError(f"amp={amp!r} is not one of {', '.join(AMP_CHOICES)}.",
                            "Set amp to auto (bf16 where the hardware has it), bf16, fp16 or none (fp32).")
    device = torch.device(device)
    if amp != "auto":
        return amp
    if device.type == "cuda":
        capability = _cuda_capability(device)
        return "bf16" if capability is None or capability >= (8, 0) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "none"


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


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model.compile(dynamic=False)`` in place when ``enabled`` (parameters and state-dict keys stay
    as they are, so checkpoints and encoder export are unaffected); returns ``model``."""
    if enabled:
        if not hasattr(torch, "compile"):
            raise MimbenchError("runtime.compile=True needs torch.compile (PyTorch >= 2.0).",
                                "Upgrade PyTorch or set runtime.compile=False.")
        model.compile(dynamic=False)
    return model
