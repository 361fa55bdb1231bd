# DDAE (deep dual-supervised MAE with an EMA-teacher distillation), ViT-tiny/4 on Fashion-MNIST.
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "ddae"
model = dict(_delete_=True, name="ddae_vit_tiny_patch4_32", dds_depths=None, dds_weights=None, distill_depths=None)
