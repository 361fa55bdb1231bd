# MAE linear probe, ViT-B on ImageNet-1k (facebookresearch/mae FINETUNE.md "Linear Probing" + main_linprobe.py):
# frozen encoder (eval mode), class token after the final norm, head BatchNorm1d(affine=False, eps=1e-6) + Linear
# (trunc-normal std 0.01, bias 0); LARS momentum 0.9, trust 0.001, weight decay 0 (1-D params not adapted);
# blr 0.1, lr = blr * 16384 / 256 = 6.4; effective batch 16384 = 512 per step x accumulation (512 x 32 GPUs in
# the reference, so the head's batch statistics are over 512 images, as there); 90 epochs, 10 warm-up, cosine
# to 0 per iteration; RandomResizedCrop(224, bicubic) + flip; val Resize 256 bicubic + CenterCrop 224.
# Reported: 68.0 (MAE paper), 67.8 (repository re-run).
_base_ = ["../_base_/runtime.py", "../_base_/data.py"]
mode = "protocol"
img_size = 224
optim = dict(name="lars", blr=0.1, lr=None, momentum=0.9, trust_coeff=0.001, weight_decay=0.0,
             batch_size=512, eff_batch_size=16384)
schedule = dict(epochs=90, warmup_epochs=10, min_lr=0.0)
augment = dict(scale=(0.08, 1.0))
cache_dir = None
feature_batch_size = 256
deviations = []
