# BEiT v2 + deep dynamic supervision, ViT-B/16, ImageNet-1k, 300 epochs (the 300-epoch BEiT v2 recipe).
_base_ = ["./beitv2_vit-b_in1k_300ep.py"]
technique = "beitv2+dds"
model = dict(name="beitv2+dds_vit_base_patch16", dds_depths=None, dds_weights=None)
