# VQ-KD visual tokenizer for BEiT v2, ViT-B/16 encoder + 3-block decoder, 8192 x 32 codebook, ImageNet-1k,
# 100 epochs (BEiT v2 TOKENIZER.md, vqkd_encoder_base_decoder_3x768x12_clip): AdamW betas (0.9, 0.99),
# wd 1e-4, lr 5e-5 x (512 / 128) = 2e-4 at batch 8 x 64 = 512 (the script scales by batch/128), i.e.
# blr 1e-4 here (lr = blr * batch / 256); 10 warm-up epochs, cosine to 1e-5; k-means codebook init; cosine
# regression of the teacher's patch features. The official teacher is CLIP ViT-B/16, which is not an encoder
# file of this project: give any encoder file as teacher with --set model.teacher=PATH (its patch grid must be
# 14x14 at 224 px). Deviation: the official crop scale is (0.08, 1); the project's pipeline uses (0.2, 1).
# Output: tokenizer.safetensors, the file BEiT v2 configs take as model.tokenizer.
_base_ = ["./_base_/default.py"]
technique = "vqkd"
model = dict(_delete_=True, name="vqkd_vit_base_patch16", teacher=None, decay=0.99, commitment=1.0,
             kmeans_init=True, dead_code_ratio=0.01)
data = dict(img_size=224, num_workers=10)
optim = dict(blr=1e-4, weight_decay=1e-4, betas=(0.9, 0.99), batch_size=64, accum_iter=1, eff_batch_size=512,
             clip_grad=None)
schedule = dict(epochs=100, warmup_epochs=10, min_lr=1e-5)
runtime = dict(seed=0, ckpt_every=20, log_every=20, mask_ratio=None, amp="auto")
