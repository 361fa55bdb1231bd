# MAE + DDS, ViT-micro/4 (embed 64, depth 4): the size of mae_micro_fmnist.py (the demo's encoders).
_base_ = ["./mae-dds_tiny_fmnist.py"]
model = dict(name="mae+dds_vit_micro_patch4_32")
data = dict(limit=2048)  # first 2048 training images: seconds per epoch
optim = dict(batch_size=32)
schedule = dict(epochs=2, warmup_epochs=1)
runtime = dict(ckpt_every=1, log_every=5)
