# MAE fine-tuning, ViT-B on ImageNet-1k (facebookresearch/mae FINETUNE.md, main_finetune.py, util/lr_decay.py):
# global average pool + fc_norm, head trunc-normal std 2e-5, drop path 0.1; AdamW (0.9, 0.999) wd 0.05
# (no decay: 1-D params, pos_embed, cls_token), layer decay 0.65; blr 5e-4, lr = blr * 1024 / 256;
# effective batch 1024 (32 x 32 GPUs in the reference; here batch_size per step x accumulation x processes);
# 100 epochs, 5 warm-up, cosine to 1e-6 per iteration; Mixup 0.8 / CutMix 1.0 / smoothing 0.1 with
# SoftTargetCrossEntropy; RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 pixel mode 1 box; no grad clipping.
# Reported: 83.6 (MAE paper), 83.57 (repository, mean of 4 seeds).
_base_ = ["../_base_/runtime.py", "../_base_/data.py"]
img_size = 224
model = dict(drop_path=0.1, head_init_std=2e-5)
optim = dict(blr=5e-4, lr=None, weight_decay=0.05, layer_decay=0.65, betas=(0.9, 0.999),
             batch_size=128, eff_batch_size=1024)
schedule = dict(epochs=100, warmup_epochs=5, min_lr=1e-6)
mixup = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, prob=1.0, switch_prob=0.5, mode="batch")
augment = dict(mode="timm", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1)
clip_grad = None
deviations = []
