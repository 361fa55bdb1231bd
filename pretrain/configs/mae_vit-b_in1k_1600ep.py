# MAE ViT-B/16 on ImageNet-1k, the paper's 1600-epoch setting (official facebookresearch/mae recipe):
# 224px, mask ratio 0.75, normalised-pixel targets (norm_pix_loss, written target_norm="patch"),
# AdamW betas (0.9, 0.95), wd 0.05, blr 1.5e-4, effective batch 4096 (lr = 2.4e-3), 40 warm-up epochs,
# cosine to 0. eff_batch_size fixes 4096 on any process count (64 per process; accum_iter derived).
_base_ = ["./_base_/default.py"]
technique = "mae"
model = dict(_delete_=True, name="mae_vit_base_patch16", target_norm="patch", decoder_attn_drop=0.0,
             mask_token_layer=None, mask_token_ratio=0.0)
data = dict(img_size=224, num_workers=10)
optim = dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), batch_size=64, accum_iter=1, eff_batch_size=4096)
schedule = dict(epochs=1600, warmup_epochs=40, min_lr=0.0)
runtime = dict(seed=0, ckpt_every=20, log_every=20, mask_ratio=0.75, amp="auto")
