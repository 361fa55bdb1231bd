# Attentive probe with V-JEPA's pooler, ViT-L on ImageNet-1k (facebookresearch/jepa src/models/attentive_pooler.py,
# configs/evals/vitl16_in1k.yaml): one query (trunc-normal 0.02); q = q + xattn(q, LN(x)); q = q + MLP(LN(q)),
# MLP ratio 4, qkv bias; the defined output projection is never applied; then Linear. Keys = patch tokens after the
# final norm (V-JEPA's encoders have no class token). AdamW lr 1e-3 absolute, no warm-up, cosine to 0; weight decay
# 0.001 cosine to 1e-6; 20 epochs; batch 1024; gradient clipping 1.0; timm AutoAugment "original" + random erasing
# 0.25 (pixel, count 1); val Resize(int(224 * 256 / 224)) -> CenterCrop 224.
# Reported: V-JEPA L/16 74.8, H/16 75.9 (224) - V-JEPA README.
_base_ = ["../_base_/runtime.py", "../_base_/data.py"]
mode = "protocol"
img_size = 224
head = dict(preset="vjepa", num_queries=1, num_heads=None, mlp_ratio=4.0, tokens="patch", final_norm=True)
optim = dict(name="adamw", lr=1e-3, blr=None, betas=(0.9, 0.999), weight_decay=0.001, final_weight_decay=1e-6,
             batch_size=128, eff_batch_size=1024)
schedule = dict(epochs=20, warmup_epochs=0, min_lr=0.0)
augment = dict(mode="timm", auto_augment="original", re_prob=0.25, re_mode="pixel", re_count=1)
clip_grad = 1.0
deviations = []
selection = dict(best_epoch=False)  # the last epoch is reported: no epoch is selected
