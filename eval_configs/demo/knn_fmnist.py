# k-NN demo on the embedded Fashion-MNIST subset (12,000 train / 2,000 val, 32x32): the DINO protocol
# (k=20, T=0.07, cosine on L2-normalised class tokens) on all of it. Runs in seconds on a CPU.
_base_ = ["../_base_/demo_data.py"]
knn = dict(k=20, temperature=0.07)
img_size = None          # the encoder's own resolution (32 for the CPU presets)
batch_size = 256
cache_dir = None         # None: <out>/feature_cache
deviations = ["dataset: embedded Fashion-MNIST subset (32x32) instead of ImageNet-1k"]
runtime = dict(seed=0)
