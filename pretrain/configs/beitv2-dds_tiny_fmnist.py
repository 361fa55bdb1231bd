# Demo-scale BEiT v2 + deep dynamic supervision (CPU): beitv2_tiny_fmnist.py with DDS at MAE+DDS's defaults
# (depths 2, 4, 6 of the 6 blocks; learnable beta -1 -> 1).
_base_ = ["./beitv2_tiny_fmnist.py"]
technique = "beitv2+dds"
model = dict(name="beitv2+dds_vit_tiny_patch4_32", dds_depths=None, dds_weights=None)
