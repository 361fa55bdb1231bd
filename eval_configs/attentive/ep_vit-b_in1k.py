# Efficient Probing, ViT-B on ImageNet-1k (billpsomas/efficient-probing poolings/ep.py, arXiv 2506.10178): Q = 32
# queries (randn * 0.02); keys = the raw patch tokens (no key projection; class token excluded; the last block's
# output, which EP's models_vit.forward_features returns without the final norm); one value Linear split in Q
# chunks, concatenated back to D; the MAE linear probe's BatchNorm1d(affine=False) + Linear. In the MAE linprobe
# code base: LARS (momentum 0.9, trust 0.001) blr 0.1, weight decay 0, batch 4096 (512 per step x 8 in the
# reference), 90 epochs, 10 warm-up, cosine to 0; RandomResizedCrop (bicubic) + flip; val Resize 256 -> CenterCrop 224.
# The repository reports the best epoch, selected on val; this config reports the best epoch too, selected by
# default on a held-out 10 % of the training set (never trained on); --select-on val selects it on val as published.
# Reported: MAE-S 64.6, MAE-B 75.46, MAE-L 79.52 (linear 47.1 / 67.78 / 76.01) - repository results.csv.
_base_ = ["../_base_/runtime.py", "../_base_/data.py"]
mode = "protocol"
img_size = 224
head = dict(preset="ep", num_queries=32, num_heads=1, tokens="patch", final_norm=False)
optim = dict(name="lars", blr=0.1, lr=None, momentum=0.9, trust_coeff=0.001, weight_decay=0.0,
             batch_size=512, eff_batch_size=4096)
schedule = dict(epochs=90, warmup_epochs=10, min_lr=0.0)
augment = dict(mode="rrc_flip", scale=(0.08, 1.0))
clip_grad = None
deviations = []
selection = dict(best_epoch=True, on="train-holdout", holdout=0.1)
