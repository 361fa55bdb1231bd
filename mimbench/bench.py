"""Throughput of a pre-training model on random images (no data loading), for sizing runs.

``train`` times a full optimizer step (forward at mask ratio 0.75, backward, AdamW step) and
``forward`` a no-grad forward, both under the same precision the training loop uses (bf16 autocast
on CUDA, fp32 on CPU). Two untimed warm-up steps come first; CUDA is synchronised before reading
the clock.
"""
from __future__ import annotations

import time

import torch

from mimbench.errors import MimbenchError

WHAT = ("train", "forward")


def run_bench(what: str = "train", preset: str = "mae_vit_tiny_patch4_32", batch: int = 64, steps: int = 10,
              *, device: str | None = None, mask_ratio: float = 0.75) -> str:
    """Time ``steps`` steps of ``what`` for registry model ``preset``; returns a one-line report
    ``"<what> <preset> batch=B device=D: X img/s (Y ms/step)"``."""
    if what not in WHAT:
        raise MimbenchError(f"Unknown benchmark {what!r}.", f"Choose one of: {', '.join(WHAT)}.")
    if batch < 1 or steps < 1:
        raise MimbenchError(f"batch={batch} and steps={steps} must both be >= 1.", "Pass positive numbers.")
    from pretrain import create_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(preset).to(dev)
    size = int(model.encoder_arch()["img_size"])
    imgs = torch.randn(batch, 3, size, size, device=dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def autocast():
        if dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def one() -> None:
        if what == "train":
            model.train()
            with autocast():
                loss, _, _ = model(imgs, mask_ratio=mask_ratio)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.on_step_end(0, 1)
        else:
            model.eval()
            with torch.no_grad(), autocast():
                model(imgs, mask_ratio=mask_ratio)

    for _ in range(2):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    ips = batch * steps / dt
    return (f"{what} {preset} batch={batch} device={dev.type} threads={torch.get_num_threads()}: "
            f"{ips:.1f} img/s ({1000 * dt / steps:.1f} ms/step)")
