# Low-shot demo on the embedded Fashion-MNIST subset (12,000 train / 2,000 val, 32x32): MSN's logistic regression
# (centred + L2-normalised class tokens, lambd 0.00025 / N, no intercept, cyanure) on 10 images per class drawn
# with 3 seeds; the record gives mean ± std. Seconds on a CPU once the features are cached. A split file of the
# built-in data lists image indices of its train split (0..11999), one per line.
_base_ = ["../_base_/demo_data.py"]
img_size = None          # the encoder's own resolution
lowshot = dict(split_files=[], shots=10, seeds=3)
classifier = dict(name="msn-logreg", lambd=0.00025, tol=1e-3, max_iter=300)
batch_size = 256
cache_dir = None         # None: <out>/feature_cache
deviations = ["dataset: embedded Fashion-MNIST subset (32x32) instead of ImageNet-1k",
              "subset: lowshot.shots images per class drawn with lowshot.seeds seeds instead of MSN's split files"]
runtime = dict(seed=0)
