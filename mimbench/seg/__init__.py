"""Semantic segmentation with mmsegmentation (UperNet on ViT encoders).

Importing this package first makes ``mmcv.ops`` importable on installs that only
have ``mmcv-lite`` (see :mod:`mimbench.seg.mmcv_ops_fallback`), so it must be
imported before anything from ``mmseg``. It then makes mmengine load local
checkpoints weights-only (:mod:`mimbench.seg.checkpoint`) and registers the
project's dataset, Eva-family backbone (:mod:`mimbench.seg.eva_backbone`), metric (per-class IoU),
optimizer constructor (layer-wise
decay with the BEiT/MAE weight-decay exclusions) the hook that carries every
rank's RNG state through checkpoints (:mod:`mimbench.seg.resume`), the one that
stops every rank at a non-finite loss (:mod:`mimbench.seg.safety`) and the one
that keeps the final validation's metrics (:mod:`mimbench.seg.metrics`) in
mmseg's registries.
"""

from mimbench.seg import mmcv_ops_fallback

MMCV_OPS_FALLBACK = mmcv_ops_fallback.install()

from mimbench.seg import checkpoint  # noqa: E402

checkpoint.install()

from mimbench.seg.datasets import FASHION_MNIST_SEG_CLASSES, FashionMNISTSegDataset  # noqa: E402
from mimbench.seg.eva_backbone import MAEStyleEva  # noqa: E402
from mimbench.seg.metrics import FinalValidationHook, PerClassIoUMetric  # noqa: E402
from mimbench.seg.optim import MimLayerDecayOptimizerConstructor  # noqa: E402
from mimbench.seg.resume import RngStateHook  # noqa: E402
from mimbench.seg.safety import NonFiniteLossHook  # noqa: E402
from mimbench.seg.vit_backbone import MAEStyleViT  # noqa: E402

__all__ = ["MMCV_OPS_FALLBACK", "FASHION_MNIST_SEG_CLASSES", "FashionMNISTSegDataset", "FinalValidationHook",
           "MAEStyleEva", "MAEStyleViT", "MimLayerDecayOptimizerConstructor",
           "NonFiniteLossHook", "PerClassIoUMetric", "RngStateHook"]
