# MAE + deep distance supervision (no teacher) ViT-B/16, ImageNet-1k, 800 epochs, MAE optimisation recipe.
_base_ = ["./mae_vit-b_in1k_800ep.py"]
technique = "mae+dds"
model = dict(_delete_=True, name="mae+dds_vit_base_patch16", dds_depths=None, dds_weights=None)
