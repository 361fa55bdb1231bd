# MAE linear probe, ViT-H/14 on ImageNet-1k: as ViT-B but 50 epochs (facebookresearch/mae FINETUNE.md "Linear
# Probing": "To train ViT-Large or ViT-Huge ... It is sufficient to train 50 epochs").
# Reported: 76.6 (MAE paper, Table 12), 77.2 (repository re-run, PT/GPU).
_base_ = ["./mae_vit-b_in1k.py"]
schedule = dict(epochs=50, warmup_epochs=10, min_lr=0.0)
