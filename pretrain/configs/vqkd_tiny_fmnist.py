# Demo-scale VQ-KD tokenizer on the built-in Fashion-MNIST subset (CPU): ViT-tiny/4 encoder (128 x 4 blocks),
# 1-block decoder, 512 codes of 32 dims on the 8x8 grid of the 32x32 images. The teacher is a project encoder
# file - by default the demo's MAE (run `mimbench pretrain pretrain/configs/mae_tiny_fmnist.py --out
# runs/pretrain/mae_tiny_fmnist` first, or --set model.teacher=PATH): a self-contained stand-in for CLIP,
# so the BEiT v2 demo runs without downloads. Optimisation as the other CPU configs (blr 1e-3, 4 epochs).
_base_ = ["./_base_/fmnist_cpu.py"]
technique = "vqkd"
model = dict(_delete_=True, name="vqkd_vit_tiny_patch4_32", teacher="runs/pretrain/mae_tiny_fmnist/encoder.safetensors",
             decay=0.99, commitment=1.0, kmeans_init=True, dead_code_ratio=0.01)
optim = dict(weight_decay=1e-4, betas=(0.9, 0.99))
runtime = dict(mask_ratio=None)
