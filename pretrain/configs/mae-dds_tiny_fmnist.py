# MAE + deep distance supervision only (no teacher), ViT-tiny/4 on Fashion-MNIST.
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "mae+dds"
model = dict(_delete_=True, name="mae+dds_vit_tiny_patch4_32", dds_depths=None, dds_weights=None)
