# Runtime of the demo evaluations (minutes on a CPU): no per-epoch checkpoints, plain log lines.
_base_ = ["./runtime.py"]
runtime = dict(ckpt_every=0, progress=False)
