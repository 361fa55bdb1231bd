# BEiT v2 + DDS, ViT-micro/4: beitv2_micro_fmnist.py with DDS at MAE+DDS's defaults (depths 1, 3 and 4 of 4).
_base_ = ["./beitv2_micro_fmnist.py"]
technique = "beitv2+dds"
model = dict(name="beitv2+dds_vit_micro_patch4_32", dds_depths=None, dds_weights=None)
