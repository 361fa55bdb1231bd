# MSN low-shot evaluation on ImageNet-1k (facebookresearch/msn logistic_eval.py): frozen encoder, no augmentation
# (train and val: Resize 256 bicubic -> CenterCrop 224); each class token centred then L2-normalised per sample;
# cyanure multiclass logistic regression, L2 penalty lambd / N with lambd = 0.00025 (N = training images), no
# intercept, tol 1e-3, at most 300 epochs. The subset is given on the command line:
#   MSN:    --split-file imagenet_subsets{1,2,3}/{1,2,5}imgs_class.txt (3 splits per shot count; report mean ± std;
#           split 3's 5-image file is named 3imgs_class.txt and holds 5,000 lines: counted, not read from its name)
#   SimCLR: --split-file 1percent.txt (12,811 lines) or 10percent.txt (128,116 lines), one split each
#   or:     --shots K --seeds N (K images per class drawn with seeds runtime.seed .. runtime.seed + N - 1)
# Deviation (recorded): the class token after the final norm (MSN: before it; the feature cache holds the normed one).
# Published MAE low-shot (MIM-Refiner README, classifier per cell not stated): ViT-L/16 1-shot 14.3, 2-shot 34.9,
# 5-shot 56.9, 1 % 67.7, 10 % 79.3.
_base_ = ["../_base_/data.py"]
img_size = 224
lowshot = dict(split_files=[], shots=None, seeds=3)
classifier = dict(name="msn-logreg", lambd=0.00025, tol=1e-3, max_iter=300)
batch_size = 256         # feature extraction only (inference mode); does not change the result
cache_dir = None         # None: <out>/feature_cache
deviations = []
runtime = dict(seed=0, amp="auto")
