# Base of the DDAE ablation grid (mimbench reproduce ddae): pretrain/configs/ddae_vit-b_in1k_100ep.py with the knobs the
# grid varies written out at the model's defaults, so that each grid point can --set them.
_base_ = ["pretrain/ddae_vit-b_in1k_100ep"]  # the shipped pre-training config of that name
model = dict(dds_beta_mode="learnable", dds_beta_start=-1.0, distill_weight=1.0)
