# ADE20K semantic segmentation: UperNet on a ViT-L/16 encoder, 160k iterations at 512x512.
#
# The ViT-B protocol (upernet_vit-b_ade20k_512x512_160k.py: data, heads, schedule, AMP, the
# MimLayerDecayOptimizerConstructor and its header's deliberate differences) with the large model's
# sizes and optimisation values overridden below. mmsegmentation 1.2.2 has no MAE ViT-L config, so
# the large-model values are BEiT's ViT-L ADE20K recipe, microsoft/unilm
#   beit/semantic_segmentation/configs/beit/upernet/upernet_beit_large_24_512_slide_160k_ade20k.py
# (same values in its _ms and _pt2ft variants): depth 24, width 1024, 16 heads, out_indices
# [7, 11, 15, 23], UPerHead channels 1024, drop_path_rate 0.2, AdamW lr 2e-5, weight decay 0.05,
# layer_decay_rate 0.95 over 24 layers, linear warm-up 1500 iterations from 1e-6, then poly decay
# (power 1.0, min_lr 0) to 160k; batch 8 GPUs x 2 images; mixed precision.
# Kept from the ViT-B file on purpose: init_values=1.0 (BEiT's 1e-6 is a layer-scale init for BEiT
# checkpoints; MAE encoders have no layer scale, so the converted blocks need an identity scale).
# Published: MAE ViT-L 53.6 mIoU (He et al., "Masked Autoencoders Are Scalable Vision Learners",
# CVPR 2022, Table 7; the MAE authors searched the learning rate per entry, so 2e-5 is BEiT's choice,
# not a value the MAE paper states).

_base_ = ["./upernet_vit-b_ade20k_512x512_160k.py"]

model = dict(
    backbone=dict(
        embed_dims=1024,
        num_layers=24,
        num_heads=16,
        out_indices=[7, 11, 15, 23],
        drop_path_rate=0.2,
    ),
    neck=dict(embed_dim=1024),
    decode_head=dict(in_channels=[1024] * 4, channels=1024),
    auxiliary_head=dict(in_channels=1024),
)

optim_wrapper = dict(
    optimizer=dict(lr=2e-5),  # betas (0.9, 0.999), weight_decay 0.05 as for ViT-B
    paramwise_cfg=dict(num_layers=24, layer_decay_rate=0.95),
)
# param_scheduler (LinearLR from 1e-6 over 1500 iterations, then PolyLR power 1 to 160k) is the
# ViT-B file's and equals the BEiT-L recipe's lr_config.
