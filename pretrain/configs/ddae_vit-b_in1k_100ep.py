# DDAE ViT-B/16, ImageNet-1k, 100 epochs (the short-schedule ablation budget), MAE optimisation recipe
# with 10 warm-up epochs; DDAE knobs at the model's defaults (docs/techniques.md).
_base_ = ["./mae_vit-b_in1k_800ep.py"]
technique = "ddae"
model = dict(_delete_=True, name="ddae_vit_base_patch16", dds_depths=None, dds_weights=None, distill_depths=None)
schedule = dict(epochs=100, warmup_epochs=10)
