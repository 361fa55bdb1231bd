# BEiT v2 ViT-B/16, ImageNet-1k, 300 epochs: the 1600-epoch recipe with the short-schedule values of
# PRETRAINING.md ("--opt_betas: 0.98 for 300 epochs", "--drop_path: 0. for 300 epochs").
_base_ = ["./beitv2_vit-b_in1k_1600ep.py"]
model = dict(drop_path_rate=0.0)
optim = dict(betas=(0.9, 0.98))
schedule = dict(epochs=300)
