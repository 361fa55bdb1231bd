# Shared CPU settings for the built-in Fashion-MNIST subset at 32x32 (ViT-tiny, patch 4: 8x8 grid).
_base_ = ["./default.py"]
data = dict(img_size=32, num_workers=0)
# blr 1e-3 (not the ImageNet 1.5e-4): a few-epoch schedule on a small model needs a larger step to move.
optim = dict(blr=1e-3, batch_size=64, accum_iter=1, eff_batch_size=None)
# 4 epochs over the 12k-image subset (750 steps of 64): about 3 minutes for ViT-tiny on 2 CPU cores.
schedule = dict(epochs=4, warmup_epochs=0.5, min_lr=0.0)
runtime = dict(seed=0, ckpt_every=2, log_every=10, mask_ratio=0.75, amp="auto")
