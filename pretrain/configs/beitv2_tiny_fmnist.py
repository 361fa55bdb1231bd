# Demo-scale BEiT v2 on the built-in Fashion-MNIST subset (CPU): ViT-tiny/4 (128 x 6 blocks, 4 heads) with
# BEiT v2's structure (shared relative position bias, layer scale 0.1), 25 of the 64 patches masked
# block-wise (BEiT v2's 75/196, blocks >= 5 patches = its 16/196 of the grid), and the class-token head as in
# the official recipe (..._cls_pt: patch tokens after block 9 of 12 + 2 head blocks; here after block 4 of 6):
# without it no loss reaches the class token that k-NN and the linear probe read.
# model.tokenizer: the demo tokenizer from vqkd_tiny_fmnist.py (--set model.tokenizer=PATH for another).
# Same optimisation and budget as mae_tiny_fmnist.py (blr 1e-3, 4 epochs) with BEiT v2's betas (0.9, 0.98)
# and gradient clipping 3.0.
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "beitv2"
model = dict(_delete_=True, name="beitv2_vit_tiny_patch4_32", tokenizer="runs/pretrain/vqkd_tiny_fmnist/tokenizer.safetensors",
             drop_path_rate=0.0, layer_scale_init_value=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=True, num_mask_patches=25, min_mask_patches_per_block=5,
             max_mask_patches_per_block=None, mask_min_aspect=0.3, mask_max_aspect=None, cls_pt=True,
             cls_pt_early_layers=4, cls_pt_head_layers=2, cls_pt_shared_lm_head=True)
optim = dict(betas=(0.9, 0.98), clip_grad=3.0)
runtime = dict(mask_ratio=None)
