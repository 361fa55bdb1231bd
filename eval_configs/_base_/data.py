# The data block of the evaluations at protocol scale (ImageNet-style folders).
data = dict(
    limit_train=None,       # None: every image of the split
    limit_val=None,
    max_bad_fraction=0.001,  # broken files skipped up to 0.1 % of a split
    num_workers=10,          # loader processes
)
