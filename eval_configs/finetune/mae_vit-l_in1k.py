# MAE fine-tuning, ViT-L on ImageNet-1k: as ViT-B but blr 1e-3, layer decay 0.75, drop path 0.2, 50 epochs
# (facebookresearch/mae FINETUNE.md). Reported: 85.9 (MAE paper), 85.87 (repository).
_base_ = ["./mae_vit-b_in1k.py"]
model = dict(drop_path=0.2)
optim = dict(blr=1e-3, layer_decay=0.75)
schedule = dict(epochs=50, warmup_epochs=5, min_lr=1e-6)
