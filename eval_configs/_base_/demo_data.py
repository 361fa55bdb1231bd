# Data of the demo evaluations: all of the embedded Fashion-MNIST subset (12,000 train / 2,000 val, 32x32),
# decoded in the main process.
_base_ = ["./data.py"]
data = dict(num_workers=0)
