"""Semantic segmentation with mmsegmentation (UperNet on ViT encoders).

Importing this package first makes ``mmcv.ops`` importable on installs that only
have ``mmcv-lite`` (see :mod:`mimbench.seg.mmcv_ops_fallback`), so it must be
imported before anything from ``mmseg``; it then registers the project's
dataset classes in mmseg's ``DATASETS`` registry.
"""

from mimbench.seg.mmcv_ops_fallback import install as _install_mmcv_ops_fallback

MMCV_OPS_FALLBACK = _install_mmcv_ops_fallback()

from mimbench.seg.checkpoint import install as _install_checkpoint_loader; _install_checkpoint_loader()  # noqa: E402,E702
from mimbench.seg.datasets import FASHION_MNIST_SEG_CLASSES, FashionMNISTSegDataset  # noqa: E402
from mimbench.seg.metrics import PerClassIoUMetric  # noqa: E402,F401
from mimbench.seg.optim import MimLayerDecayOptimizerConstructor  # noqa: E402,F401

__all__ = ["MMCV_OPS_FALLBACK", "FASHION_MNIST_SEG_CLASSES", "FashionMNISTSegDataset"]
