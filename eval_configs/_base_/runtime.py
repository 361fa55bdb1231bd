# The runtime block of the training evaluations (linear probe, fine-tuning) at protocol scale: how the loop runs,
# not what it computes. Keys and their meaning: mimbench/schema.py (RUNTIME_KEYS).
runtime = dict(
    seed=0,
    amp="auto",           # bf16 autocast where the hardware has it (CUDA, bf16-capable CPUs), else fp32
    ckpt_every=10,        # keep checkpoint-<epoch>.pt every 10 epochs (checkpoint-latest.pt always)
    ckpt_every_steps=0,   # >0: also checkpoint every n optimizer steps inside an epoch (resumable mid-epoch)
    log_every=20,
    progress=True,
    tensorboard=False,    # also log scalars to <out>/tensorboard (needs the tensorboard package)
)
