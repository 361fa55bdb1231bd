# MAE ViT-B/16 with the robust recipe (pretrain/models/mae.py ROBUST_RECIPE), ImageNet-1k, 800 epochs,
# on the MAE optimisation recipe.
_base_ = ["./mae_vit-b_in1k_800ep.py"]
technique = "robust-mae"
model = dict(_delete_=True, name="robust_mae_vit_base_patch16")
