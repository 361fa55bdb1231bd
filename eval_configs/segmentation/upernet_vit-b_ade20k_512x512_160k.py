# ADE20K semantic segmentation: UperNet on a ViT-B/16 encoder, 160k iterations at 512x512.
#
# Value for value the protocol of mmsegmentation 1.2.2
#   configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py
# with its _base_ files (models/upernet_mae.py, datasets/ade20k.py, default_runtime.py,
# schedules/schedule_160k.py) written out flat, so every number is visible here.
# Published results with this protocol: MAE ViT-B (1600 ep) 48.1 mIoU (He et al., "Masked
# Autoencoders Are Scalable Vision Learners", CVPR 2022, Table 7); mmsegmentation's re-run
# 48.13 single-scale / 48.70 multi-scale (configs/mae/README.md).
#
# Four deliberate differences from the file, all marked below:
#  * AMP: the file's `fp16 = dict(loss_scale='dynamic')` is a legacy mmseg 0.x key that 1.x
#    silently ignores (its optim_wrapper is a plain OptimWrapper), so the published run name
#    "amp" is only honoured here by AmpOptimWrapper with dynamic loss scaling.
#  * weights: the file's `pretrained='./pretrain/mae_pretrain_vit_base_mmcls.pth'` is replaced by
#    the encoder given on the command line (`mimbench segment --encoder ...`), converted to the
#    mmseg MAE backbone layout at run time.
#  * optimizer constructor: mmseg 1.x's LayerDecayOptimizerConstructor tests
#    `name in ('pos_embed', 'cls_token')` against full names ('backbone.pos_embed'), so it applies
#    weight decay 0.05 to pos_embed, cls_token and the relative position bias tables, which the
#    BEiT/MAE recipes exempt. MimLayerDecayOptimizerConstructor (mimbench/seg/optim.py) keeps its
#    layer ids and lr scales and gives those parameters weight decay 0; same paramwise_cfg.
#  * test padding: data_preprocessor.test_cfg pads a test image smaller than the crop up to it
#    (the padding is cropped off the prediction). The MAE backbone only takes 512x512 windows (its
#    position embedding and relative position tables are fixed), so in the file the 0.5x/0.75x
#    multi-scale passes and any image under 512 on a side after resizing fail with a size
#    mismatch; every image the file can test is tested here exactly as there.
# Total batch 16 = 8 GPUs x 2 images (train_dataloader.batch_size is per GPU).

default_scope = "mmseg"

crop_size = (512, 512)
num_classes = 150  # ADE20K SceneParsing classes; label 0 ("other") is ignored via reduce_zero_label
norm_cfg = dict(type="SyncBN", requires_grad=True)

data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],  # ImageNet mean/std in 0..255 (RGB after the swap)
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    test_cfg=dict(size=crop_size),  # differs on purpose: pads small test inputs to the crop (see header)
)

model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,  # differs on purpose: weights come from --encoder (see header)
    backbone=dict(
        type="MAE",  # BEiT-style ViT: relative position bias, layer scale
        img_size=(512, 512),
        patch_size=16,
        in_channels=3,
        embed_dims=768,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4,
        out_indices=[3, 5, 7, 11],
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        norm_cfg=dict(type="LN", eps=1e-6),
        act_cfg=dict(type="GELU"),
        norm_eval=False,
        init_values=1.0,  # layer-scale init (the _base_ file's 0.1 is overridden to 1.0)
    ),
    neck=dict(type="Feature2Pyramid", embed_dim=768, rescales=[4, 2, 1, 0.5]),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(341, 341)),
)

# ---------------------------------------------------------------- data
dataset_type = "ADE20KDataset"
data_root = "data/ade/ADEChallengeData2016"  # replaced by `mimbench segment --data`
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(2048, 512), keep_ratio=True),
    # annotations are loaded after Resize: metrics are computed at the original resolution
    dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="PackSegInputs"),
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # multi-scale (+flip) test, the 48.70 number
tta_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in img_ratios],
            [
                dict(type="RandomFlip", prob=0.0, direction="horizontal"),
                dict(type="RandomFlip", prob=1.0, direction="horizontal"),
            ],
            [dict(type="LoadAnnotations")],
            [dict(type="PackSegInputs")],
        ],
    ),
]
tta_model = dict(type="SegTTAModel")

train_dataloader = dict(
    batch_size=2,  # per GPU; x8 GPUs = 16
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        pipeline=test_pipeline,
    ),
)
# One evaluation set: validation (every val_interval and after the last iteration) and test read the same
# loader and metric. A loaded config holds two copies, so `mimbench segment` applies a --set of either
# (val_dataloader.* / test_dataloader.*, val_evaluator.* / test_evaluator.*) to both, and reports the
# validation after the last iteration as the single-scale result instead of testing a second time.
test_dataloader = val_dataloader
val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
test_evaluator = val_evaluator

# ---------------------------------------------------------------- optimisation
optim_wrapper = dict(
    type="AmpOptimWrapper",  # differs on purpose: the file's ignored fp16= key meant AMP (see header)
    loss_scale="dynamic",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # differs on purpose: mmseg's LayerDecayOptimizerConstructor decays pos_embed/cls_token/
    # relative_position_bias_table (see header); this one exempts them as BEiT/MAE do
    constructor="MimLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=160000, val_interval=16000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=16000),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
