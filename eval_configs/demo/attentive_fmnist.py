# Attentive-probe demo on the embedded Fashion-MNIST subset (12,000 train / 2,000 val, 32x32): Efficient Probing's
# head (Q = 4 queries on the patch tokens) on tokens computed once, a few minutes on a CPU. Deviations from the EP
# protocol are listed below and recorded.
_base_ = ["../_base_/demo_runtime.py", "../_base_/demo_data.py"]
data = dict(limit_train=4096)  # the first 4,096 training images: the token pass keeps the demo within its budget
mode = "cached"
img_size = None          # the encoder's own resolution
head = dict(preset="ep", num_queries=4, num_heads=1, tokens="patch", final_norm=False)
optim = dict(name="adamw", lr=1e-3, blr=None, betas=(0.9, 0.999), weight_decay=0.0, batch_size=256,
             eff_batch_size=None, accum_iter=1)
schedule = dict(epochs=10, warmup_epochs=1, min_lr=0.0)
augment = dict(mode="rrc_flip", scale=(0.08, 1.0))
feature_batch_size = 256
clip_grad = None
deviations = [
    "dataset: embedded Fashion-MNIST subset (32x32) instead of ImageNet-1k; 4,096 of its 12,000 training images",
    "head: 4 queries instead of 32 (the demo encoders are 64 wide)",
    "optimizer: AdamW lr 1e-3, batch 256 instead of LARS blr 0.1, batch 4096 (the set has 12,000 images)",
    "schedule: 10 epochs, 1 warm-up instead of 90 / 10",
    "epoch: the last one reported instead of the best (no hold-out taken from the demo's training images)",
]
