# FashionMNIST-Seg demo: the ADE20K UperNet recipe shrunk to run in minutes on a CPU.
#
# Same components and optimisation rules as upernet_vit-b_ade20k_512x512_160k.py (MAE backbone,
# Feature2Pyramid, UPerHead + FCN auxiliary head at weight 0.4, AdamW with layer-wise decay 0.65,
# linear warm-up then poly decay); smaller crop, head widths and schedule. The backbone size
# (patch, width, depth, heads) is taken from the encoder at run time; out_indices are given for a
# 12-block encoder and scaled to the encoder's depth. Label 0 (background) is a scored class.
# The crop is the built-in encoders' pre-training size (32x32, patch 4): the backbone then runs on
# its own position-embedding grid (see mimbench/data/seg.py for what a 64x64 crop measured).

default_scope = "mmseg"

crop_size = (32, 32)
num_classes = 11  # background + 10 Fashion-MNIST garments
norm_cfg = dict(type="BN", requires_grad=True)  # single process on CPU

data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[72.94, 72.94, 72.94],  # Fashion-MNIST pixel mean/std (0.2860, 0.3530) x 255, grey replicated
    std=[90.02, 90.02, 90.02],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
    # Test inputs smaller than the crop are padded up to it (and the padding cropped off the
    # prediction): the MAE backbone only takes crop-sized windows, so without this the 0.5x
    # multi-scale pass fails. Images at least crop-sized are left as they are.
    test_cfg=dict(size=crop_size),
)

model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="MAE",
        img_size=crop_size,
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
        init_values=1.0,
    ),
    neck=dict(type="Feature2Pyramid", embed_dim=768, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,  # 768 in the ADE20K protocol
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
        channels=32,  # 256 in the ADE20K protocol
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    # Sliding window as in the ADE20K protocol (stride 2/3 of the crop, there 341 of 512); a
    # 32x32 image is one window, larger multi-scale copies several.
    test_cfg=dict(mode="slide", crop_size=crop_size, stride=(21, 21)),
)

dataset_type = "FashionMNISTSegDataset"
data_root = "data/fashion-mnist-seg"  # replaced by `mimbench eval segment --data`
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),  # zero label kept: the dataset has reduce_zero_label=False
    dict(type="RandomResize", scale=crop_size, ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=crop_size, keep_ratio=False),
    dict(type="LoadAnnotations"),  # zero label kept: the dataset has reduce_zero_label=False
    dict(type="PackSegInputs"),
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # multi-scale (+flip) test, as for ADE20K
tta_pipeline = [
    dict(type="LoadImageFromFile"),
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
    batch_size=8,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
        pipeline=train_pipeline,
    ),
)
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
# No validation during the short schedule: the test loop after training gives the reported numbers.
# (With one, mimbench makes it read test_dataloader/test_evaluator, and reports the validation mmengine
# runs after the last iteration instead of testing the same model on the same split again.)
val_dataloader = None
val_cfg = None
val_evaluator = None

max_iters = 1000  # about 2.5 minutes for ViT-tiny/4 (batch 8, 32x32) on 2 idle CPU cores
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    # mmseg's LayerDecayOptimizerConstructor but without weight decay on pos_embed, cls_token and
    # relative_position_bias_table, as in BEiT/MAE (mimbench/seg/optim.py)
    constructor="MimLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=10),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=10, end=max_iters, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters)
test_cfg = dict(type="TestLoop")
randomness = dict(seed=0)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=250, max_keep_ckpts=2),  # resumable every ~40 s
    sampler_seed=dict(type="DistSamplerSeedHook"),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="gloo"))
log_processor = dict(by_epoch=False)
log_level = "WARNING"
load_from = None
resume = False
