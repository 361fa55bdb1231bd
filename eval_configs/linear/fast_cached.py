# Fast linear probe: the MAE head, optimizer and schedule (see mae_vit-b_in1k.py) trained on class-token
# features of the un-augmented training images, extracted once and cached (Resize 256 bicubic + CenterCrop 224).
# Deviation from the protocol (recorded): no RandomResizedCrop / flip augmentation during head training.
_base_ = ["./mae_vit-b_in1k.py"]
mode = "cached"
