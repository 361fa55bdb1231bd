# BEiT v2 + deep dynamic supervision on the token-prediction loss, ViT-B/16, ImageNet-1k, 1600 epochs:
# the BEiT v2 recipe unchanged, DDS knobs at MAE+DDS's defaults (depths 4, 8, 12; learnable beta -1 -> 1).
_base_ = ["./beitv2_vit-b_in1k_1600ep.py"]
technique = "beitv2+dds"
model = dict(name="beitv2+dds_vit_base_patch16", dds_depths=None, dds_weights=None)
