# BEiT v2, ViT-micro/4 (embed 64, depth 4): beitv2_tiny_fmnist.py at the demo encoders' size, with the
# class-token head over the patch tokens after block 2 (+ 2 head blocks), the micro tokenizer.
_base_ = ["./beitv2_tiny_fmnist.py"]
model = dict(name="beitv2_vit_micro_patch4_32", tokenizer="runs/pretrain/vqkd_micro_fmnist/tokenizer.safetensors",
             cls_pt_early_layers=2)
data = dict(limit=2048)  # first 2048 training images: seconds per epoch
optim = dict(batch_size=32)
schedule = dict(epochs=2, warmup_epochs=1)
runtime = dict(ckpt_every=1, log_every=5)
