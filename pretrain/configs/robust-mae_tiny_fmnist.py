# MAE with the robust recipe (decoder attention dropout, EMA target normalisation, mask tokens from the
# middle encoder layer; defaults in pretrain/models/mae.py ROBUST_RECIPE), ViT-tiny/4 on Fashion-MNIST.
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "robust-mae"
model = dict(_delete_=True, name="robust_mae_vit_tiny_patch4_32")
