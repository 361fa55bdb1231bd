# MAE + DDS at the micro size of pretrain/configs/mae_micro_fmnist.py, for the quick DDAE grid.
_base_ = ["pretrain/mae-dds_tiny_fmnist"]  # the shipped pre-training config of that name
model = dict(name="mae+dds_vit_micro_patch4_32")
optim = dict(batch_size=32)
schedule = dict(epochs=2, warmup_epochs=1)
runtime = dict(ckpt_every=1, log_every=5)
