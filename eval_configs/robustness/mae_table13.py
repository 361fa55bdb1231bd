# MAE Table 13: one ImageNet-1k fine-tuned model evaluated, inference only, on ImageNet-C (mCE, lower is better),
# ImageNet-A, ImageNet-R and ImageNet-Sketch (top-1), each as its authors do (mimbench/evals/robustness.py):
# IN-A / IN-R logits restricted to their 200 classes (hendrycks/natural-adv-examples and hendrycks/imagenet-r
# eval.py), IN-C CE normalised by AlexNet's error, mCE over the 15 corruptions (google-research/augmix compute_mce),
# IN-C CenterCrop 224 only, the others Resize 256 + CenterCrop 224 (the fine-tune's eval transform).
# Published (MAE Table 13, ViT-B / L / H): IN-C 51.7 / 41.8 / 33.8, IN-A 35.9 / 57.1 / 68.2, IN-R 48.3 / 59.9 / 64.4,
# IN-Sketch 34.5 / 45.3 / 49.6; re-evaluating the released checkpoints gives IN-A 36.4 / 56.3 / 67.3 (mae#90).
# Add "v2" to sets (or --sets ...,v2) for ImageNetV2 (not in the paper; v2_variant picks the test set).
_base_ = ["../_base_/data.py"]
sets = ["in-c", "in-a", "in-r", "sketch"]
v2_variant = "matched-frequency"
allow_subset = False     # a root with a part of a set's classes is refused
img_size = None          # the fine-tuned model's own resolution
batch_size = 256         # inference only; does not change the result
deviations = []
runtime = dict(seed=0, amp="auto")
