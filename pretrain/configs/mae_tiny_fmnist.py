# MAE, ViT-tiny/4 (embed 128, depth 6) on the built-in Fashion-MNIST subset, CPU-sized.
# Knobs are written out at their plain-MAE values so ablations can --set them.
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "mae"
model = dict(_delete_=True, name="mae_vit_tiny_patch4_32", target_norm="patch", decoder_attn_drop=0.0,
             mask_token_layer=None, mask_token_ratio=0.0)
