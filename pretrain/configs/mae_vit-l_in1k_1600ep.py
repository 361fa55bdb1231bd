# MAE ViT-L/16, ImageNet-1k, 1600 epochs: same recipe as ViT-B (blr 1.5e-4, eff. batch 4096, warm-up 40).
_base_ = ["./mae_vit-b_in1k_1600ep.py"]
model = dict(name="mae_vit_large_patch16")
