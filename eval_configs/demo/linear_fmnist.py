# Linear-probe demo on the embedded Fashion-MNIST subset (12,000 train / 2,000 val, 32x32): the MAE head on cached
# class-token features, under a minute on a CPU. Deviations from the MAE protocol are listed below and recorded.
_base_ = ["../_base_/demo_runtime.py", "../_base_/demo_data.py"]
mode = "cached"
img_size = None          # the encoder's own resolution
optim = dict(name="adam", blr=None, lr=1e-3, betas=(0.9, 0.999), momentum=0.9, trust_coeff=0.001,
             weight_decay=0.0, batch_size=256, eff_batch_size=None, accum_iter=1)
schedule = dict(epochs=20, warmup_epochs=2, min_lr=0.0)
augment = dict(scale=(0.08, 1.0))
cache_dir = None
feature_batch_size = 256
deviations = [
    "dataset: embedded Fashion-MNIST subset (32x32) instead of ImageNet-1k",
    "optimizer: Adam lr 1e-3, batch 256 instead of LARS blr 0.1, batch 16384 (the set has 12,000 images)",
    "schedule: 20 epochs, 2 warm-up instead of 90 / 10",
]
