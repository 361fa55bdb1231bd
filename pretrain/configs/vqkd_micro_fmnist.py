# VQ-KD tokenizer, ViT-micro/4 encoder (embed 64, depth 4), 1-block decoder, 512 codes of 32 dims, for the
# micro-size BEiT v2 configs. The teacher is the micro MAE encoder (run `mimbench pretrain --config
# pretrain/configs/mae_micro_fmnist.py --out runs/pretrain/mae_micro_fmnist` first, or --set model.teacher=PATH).
_base_ = ["./vqkd_tiny_fmnist.py"]
model = dict(name="vqkd_vit_micro_patch4_32", teacher="runs/pretrain/mae_micro_fmnist/encoder.safetensors")
data = dict(limit=2048)  # first 2048 training images: seconds per epoch
optim = dict(batch_size=32)
schedule = dict(epochs=2, warmup_epochs=1)
runtime = dict(ckpt_every=1, log_every=5)
