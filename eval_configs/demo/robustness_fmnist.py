# Robustness demo: Fashion-MNIST-C, the embedded test split (32x32) under 11 ImageNet-C corruptions at severities
# 1-5 (imagecorruptions, mimbench/evals/robustness.py FMNIST_C_CORRUPTIONS), scored with the fine-tune's saved model;
# CE per corruption normalised by the random-initialisation control's fine-tuned error instead of AlexNet's, mCE
# their mean (100 = as robust as the control; lower is better). The demo builds the set once (1,000 images).
_base_ = ["../_base_/demo_data.py"]
sets = ["fmnist-c"]
img_size = None          # the fine-tuned model's own resolution
batch_size = 256
deviations = [
    "dataset: Fashion-MNIST-C (embedded test split, 11 corruptions x 5 severities) instead of ImageNet-C/-A/-R/-Sketch",
    "mCE normaliser: the random-init control's fine-tuned error instead of AlexNet's",
]
runtime = dict(seed=0, amp="auto")
