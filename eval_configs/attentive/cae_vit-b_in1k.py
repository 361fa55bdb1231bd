# Attentive probe with CAE's head, ViT-B on ImageNet-1k (Atten4Vis/CAE tools/run_attentive.py,
# scripts/cae_base_800e.sh): one zero-initialised query; LayerNorm on q, k, v; one cross-attention (q/k/v Linear,
# output projection), no residual, no MLP; BatchNorm1d(affine=False) then Linear; keys = all tokens after the final
# norm. SGD momentum 0.9, lr 0.4 absolute at batch 8192 (256 per step x 32 in the reference), weight decay 0;
# 90 epochs, 10 warm-up, cosine to 0; RandomResizedCrop (bicubic) + flip only; val Resize 256 -> CenterCrop 224.
# Reported: MAE-B 1600 ep 74.2 (linear 67.8), MAE-L 78.8 (linear 76.0) - CAE README.
_base_ = ["../_base_/runtime.py", "../_base_/data.py"]
mode = "protocol"
img_size = 224
head = dict(preset="cae", num_queries=1, num_heads=None, tokens="all", final_norm=True)
optim = dict(name="sgd", lr=0.4, blr=None, momentum=0.9, weight_decay=0.0, batch_size=256, eff_batch_size=8192)
schedule = dict(epochs=90, warmup_epochs=10, min_lr=0.0)
augment = dict(mode="rrc_flip", scale=(0.08, 1.0))
clip_grad = None
deviations = []
# Epoch: the last one is reported, no epoch is selected. (run_attentive.py scores val after every epoch and also
# prints the maximum; the README does not say which of the two its 74.2 / 78.8 are.)
selection = dict(best_epoch=False)
