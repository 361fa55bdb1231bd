# Base of the DDAE ablation grid (mimbench reproduce ddae): pretrain/configs/ddae_tiny_fmnist.py with the knobs the
# grid varies written out at the model's defaults, so that each grid point can --set them.
_base_ = ["pretrain/ddae_tiny_fmnist"]  # the shipped pre-training config of that name
model = dict(dds_beta_mode="learnable", dds_beta_start=-1.0, distill_weight=1.0)
