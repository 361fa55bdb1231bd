"""Training transforms of the image-folder protocols, built from timm and torchvision.

``finetune_train_transform`` is the MAE fine-tuning pipeline (``main_finetune.py`` ``build_transform``):
timm's ``create_transform`` with RandomResizedCrop (bicubic), horizontal flip, RandAugment
``rand-m9-mstd0.5-inc1`` and random erasing, then normalisation.

Two things are added in front of / inside timm's pipeline, both narrow:

* **Any image mode in, three channels out.** Greyscale, palette, CMYK and RGBA images are converted
  to RGB first (alpha is dropped, as PIL's ``convert("RGB")`` does), so every sample is a 3×S×S tensor.
* **Posterize to 0 bits.** RandAugment's "increasing" posterize maps magnitude m to
  ``bits_to_keep = 4 - int(m / 10 * 4)``; with ``mstd0.5`` a sampled magnitude is clipped to
  [0, 10], so m = 10 asks for 0 bits (every channel zeroed: a black image), which is what the
  reference implementations do (TensorFlow's and Pillow ≤ 12's ``posterize`` accept it). Pillow 13
  refuses ``bits=0`` (``ValueError: bits must be between or equal to 1 and 8``) and an ImageNet epoch
  draws it thousands of times. The posterize ops of the transform's own RandAugment / AutoAugment instance (not
  timm's global table) are given :func:`posterize`, which keeps 0..8 bits with the same lookup
  table Pillow uses for 1..8 and zeroes the channels at 0. Every other op is timm's, unchanged.
  Pillow stays at the pinned current release (security fixes) instead of being held back at 12.x.
"""
from __future__ import annotations

from timm.data import create_transform
from timm.data.auto_augment import AugmentOp
from torchvision import transforms as T

__all__ = ["ToRGB", "posterize", "finetune_train_transform", "augment_ops"]


class ToRGB:
    """Convert a PIL image of any mode to RGB (a no-op for RGB images)."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def posterize(img, bits_to_keep, **_):
    """Keep the ``bits_to_keep`` most significant bits of every channel (0..8; 0 gives a black image).

    Same result as ``PIL.ImageOps.posterize`` for 1..8 bits; also defined for 0, as RandAugment's
    increasing posterize needs at its top magnitude. Modes other than L and RGB are returned unchanged,
    as timm does for ops that do not apply to them.
    """
    bits = int(bits_to_keep)
    if bits >= 8 or img.mode not in ("L", "RGB"):
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
    lut = [i & mask for i in range(256)] * len(img.getbands())
    return img.point(lut)


def augment_ops(transform) -> list:
    """Every timm ``AugmentOp`` inside ``transform`` (RandAugment ops, AutoAugment sub-policies, AugMix ops)."""

    found, stack = [], [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp):
            found.append(t)
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            for attr in ("transforms", "ops", "policy"):
                stack.extend(getattr(t, attr, None) or [])
    return found


def finetune_train_transform(*, img_size: int, mean, std, auto_augment: str | None, re_prob: float, re_mode: str,
                             re_count: int):
    """(transform, description) of the MAE fine-tuning training pipeline for PIL images of any mode.

    Returns a torchvision ``Compose``: :class:`ToRGB`, then timm ``create_transform(input_size=img_size,
    is_training=True, color_jitter=None, auto_augment=..., interpolation="bicubic", re_prob, re_mode,
    re_count, mean, std)`` with its posterize ops given :func:`posterize` (module docstring).
    """

    timm_tf = create_transform(input_size=int(img_size), is_training=True, color_jitter=None,
                               auto_augment=auto_augment, interpolation="bicubic", re_prob=float(re_prob),
                               re_mode=re_mode, re_count=int(re_count), mean=tuple(mean), std=tuple(std))
    for op in augment_ops(timm_tf):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    transform = T.Compose([ToRGB(), *getattr(timm_tf, "transforms", [timm_tf])])
    desc = repr(timm_tf).replace("\n", " ")
    return transform, f"torgb/{desc} (posterize accepts 0 bits)"
