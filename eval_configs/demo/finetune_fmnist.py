# Fine-tuning demo on the embedded Fashion-MNIST subset (32x32): the MAE recipe (avg pool + fc_norm, layer decay,
# AdamW, Mixup/CutMix + smoothing, drop path) at CPU scale, about a minute. Deviations are listed and recorded.
img_size = None          # the encoder's own resolution
model = dict(drop_path=0.1, head_init_std=2e-5)
optim = dict(blr=1e-3, lr=None, weight_decay=0.05, layer_decay=0.65, betas=(0.9, 0.999),
             batch_size=64, eff_batch_size=None, accum_iter=1)
schedule = dict(epochs=2, warmup_epochs=1, min_lr=1e-6)
mixup = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, prob=1.0, switch_prob=0.5, mode="batch")
augment = dict(mode="tensor", auto_augment=None, re_prob=0.25, re_mode="pixel", re_count=1)
data = dict(limit_train=2048, limit_val=None)
clip_grad = None
num_workers = 0
amp = "auto"             # bf16 autocast where the hardware has it (CUDA, bf16-capable CPUs), else fp32
ckpt_every = 0
log_every = 20
progress = False
deviations = [
    "dataset: embedded Fashion-MNIST subset (32x32, first 2,048 training images) instead of ImageNet-1k",
    "schedule: 2 epochs, 1 warm-up, batch 64, blr 1e-3 instead of 100 / 5 epochs, batch 1024, blr 5e-4",
]
seed = 0
