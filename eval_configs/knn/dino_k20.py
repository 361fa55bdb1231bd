# Weighted k-NN on frozen class-token features (after the final norm), as DINO's eval_knn.py:
# cosine similarity of L2-normalised features, k=20 nearest training samples, votes exp(sim / 0.07)
# summed per class (facebookresearch/dino eval_knn.py defaults --nb_knn 20 --temperature 0.07).
# Pre-processing for folders: Resize(img_size / 0.875, bicubic) + CenterCrop(img_size) + ImageNet mean/std.
_base_ = ["../_base_/data.py"]
knn = dict(k=20, temperature=0.07)
img_size = None          # None: the encoder's own resolution
batch_size = 256         # feature extraction only (inference mode, large batches); does not change the result
data = dict(num_workers=8)
cache_dir = None         # None: <out>/feature_cache
deviations = []
runtime = dict(seed=0)
