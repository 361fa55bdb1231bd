# DDAE ViT-B/16, ImageNet-1k, 800 epochs, MAE optimisation recipe (warm-up 40).
_base_ = ["./mae_vit-b_in1k_800ep.py"]
technique = "ddae"
model = dict(_delete_=True, name="ddae_vit_base_patch16", dds_depths=None, dds_weights=None, distill_depths=None)
