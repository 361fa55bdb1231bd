# MAE ViT-B/16, ImageNet-1k, 800 epochs (the official README's example run); otherwise the 1600-epoch recipe.
_base_ = ["./mae_vit-b_in1k_1600ep.py"]
schedule = dict(epochs=800)
