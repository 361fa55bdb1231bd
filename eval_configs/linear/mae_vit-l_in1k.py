# MAE linear probe, ViT-L on ImageNet-1k: as ViT-B but 50 epochs (facebookresearch/mae FINETUNE.md "Linear Probing").
# Reported: 75.8 (MAE paper), 76.0 (repository re-run).
_base_ = ["./mae_vit-b_in1k.py"]
schedule = dict(epochs=50, warmup_epochs=10, min_lr=0.0)
