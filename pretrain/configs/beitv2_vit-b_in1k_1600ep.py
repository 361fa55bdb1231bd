# BEiT v2 ViT-B/16 on ImageNet-1k, 1600 epochs (microsoft/unilm beit2 PRETRAINING.md, base-size command):
# beit_base_patch16_224_8k_vocab_cls_pt - shared relative position bias, no absolute position embedding,
# layer scale 0.1, drop path 0.1, class-token pre-training head (early_layers 9, head_layers 2, shared lm
# head), 75 of 196 patches masked block-wise (blocks >= 16 patches), VQ-KD tokenizer
# vqkd_encoder_base_decoder_3x768x12_clip (8192 codes). AdamW betas (0.9, 0.999), eps 1e-8, wd 0.05,
# lr 1.5e-3 at batch 16 x 128 = 2048 (not scaled by the script), i.e. blr 1.875e-4 here
# (lr = blr * batch / 256); 10 warm-up epochs, cosine to 1e-5, gradient clipping 3.0.
# model.tokenizer: the official checkpoint (vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth, read with
# weights_only=True) or a tokenizer.safetensors from vqkd_vit-b_in1k_100ep.py; set it with --set model.tokenizer=PATH.
# Deviations: no colour jitter (the official pipeline adds ColorJitter 0.4), warm-up from 0 instead of 1e-6.
_base_ = ["./_base_/default.py"]
technique = "beitv2"
model = dict(_delete_=True, name="beitv2_vit_base_patch16",
             tokenizer="checkpoints/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth",
             drop_path_rate=0.1, layer_scale_init_value=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=True, num_mask_patches=75, min_mask_patches_per_block=16,
             max_mask_patches_per_block=None, mask_min_aspect=0.3, mask_max_aspect=None,
             cls_pt=True, cls_pt_early_layers=9, cls_pt_head_layers=2, cls_pt_shared_lm_head=True)
data = dict(img_size=224, num_workers=10)
optim = dict(blr=1.875e-4, weight_decay=0.05, betas=(0.9, 0.999), batch_size=128, accum_iter=1, eff_batch_size=2048,
             clip_grad=3.0)
schedule = dict(epochs=1600, warmup_epochs=10, min_lr=1e-5)
# mask_ratio=None: the block masking counts patches (model.num_mask_patches).
runtime = dict(seed=0, ckpt_every=20, log_every=20, mask_ratio=None, amp="auto")
