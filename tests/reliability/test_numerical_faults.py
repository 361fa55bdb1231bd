"""Non-finite loss or gradient: training stops naming the step, the loss terms and the gradient norm, and the
last checkpoint on disk is the last good state; under an fp16 grad scaler the overflowing step is skipped."""
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mimbench.engine import LoopConfig, fit, load_checkpoint
from mimbench.errors import MimbenchError
from mimbench.testing import write_seg_encoder, write_seg_tree

REPO = Path(__file__).resolve().parents[2]


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g))
    return net, opt, DataLoader(data, batch_size=4, shuffle=True)


def _step_with_bad_gradient(bad_from: int):
    """A finite loss whose gradient is NaN from micro-batch ``bad_from`` on: d sqrt(u^2)/du at u = 0."""
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        if calls["n"] >= bad_from:
            w = model[0].weight
            loss = loss + torch.sqrt((w.sum() - w.sum().detach()) ** 2)
        return loss, {"mse": float(loss.detach()), "beta": 0.25}

    return step


def test_non_finite_gradient_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    net, opt, loader = _setup()
    cfg = LoopConfig(epochs=2, warmup_epochs=1, ckpt_every_steps=2, progress=False)
    with pytest.raises(MimbenchError, match=r"gradient became non-finite at optimizer step 8 .*gradient norm nan.*"
                                            r"mse=[0-9.]+, beta=0.25") as err:
        fit(net, opt, loader, _step_with_bad_gradient(9), cfg, tmp_path)
    assert "checkpoint-latest.pt" in err.value.fix
    ck = load_checkpoint(tmp_path / "checkpoint-latest.pt")
    # 6 steps per epoch: the last checkpoint is after step 8 of 12 (epoch 1, step 2) - before the bad one
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 2)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_loss_mid_epoch_keeps_the_checkpoint_before_it(tmp_path):
    net, opt, loader = _setup()
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return (loss * float("inf") if calls["n"] == 5 else loss), {"mse": float(loss.detach())}

    cfg = LoopConfig(epochs=2, warmup_epochs=1, ckpt_every_steps=3, progress=False)
    with pytest.raises(MimbenchError, match=r"loss became non-finite at optimizer step 4 \(loss inf\)"):
        fit(net, opt, loader, step, cfg, tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoint-latest.pt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (0, 3)


def test_fp16_grad_scaler_skips_the_overflowing_step(tmp_path):
    net, opt, loader = _setup()
    bad = {"n": 0}

    def step(model, batch):
        bad["n"] += 1
        x, y = batch
        loss = ((model(x).float() - y) ** 2).mean()
        if bad["n"] == 3:  # one step overflows in fp16
            w = model[0].weight
            loss = loss + torch.sqrt((w.float().sum() - w.float().sum().detach()) ** 2)
        return loss, {}

    seen = []
    cfg = LoopConfig(epochs=1, warmup_epochs=0.5, amp="fp16", progress=False)

    def record(it, total):
        seen.append([p.detach().clone() for p in net.parameters()])

    fit(net, opt, loader, step, cfg, tmp_path, on_step_end=record)
    # the third optimizer step changed nothing (skipped by the scaler), every other one did
    changed = [any(not torch.equal(a, b) for a, b in zip(seen[i - 1], seen[i])) for i in range(1, len(seen))]
    assert changed[1] is False and all(changed[:1] + changed[2:])
    ck = load_checkpoint(tmp_path / "checkpoint-latest.pt")
    assert ck["scaler"]["scale"] < 65536.0  # the scaler lowered its scale after the overflow
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.slow
def test_segmentation_stops_at_a_non_finite_loss_before_checkpointing_it(tmp_path, monkeypatch):
    import mimbench.seg  # noqa: F401
    from mmseg.models.decode_heads import UPerHead

    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    root = write_seg_tree(tmp_path / "seg", n=4)

    real, calls = UPerHead.loss_by_feat, {"n": 0}

    def diverging(self, *a, **k):
        losses = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the third iteration's main loss is NaN
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(UPerHead, "loss_by_feat", diverging, raising=False)
    config = REPO / "eval_configs/segmentation/demo_fmnist_seg.py"
    out = tmp_path / "run"
    with pytest.raises(MimbenchError, match=r"non-finite at iteration 3; loss terms: .*decode.loss_ce=nan"):
        run_segment(encoder=enc, config=config, data=str(root), out=out,
                    overrides=["default_hooks.checkpoint.interval=1", "default_hooks.checkpoint.max_keep_ckpts=-1",
                               "train_dataloader.batch_size=2", "train_cfg.max_iters=5"])
    work = out / "mmseg"
    assert (work / "iter_2.pth").is_file() and not (work / "iter_3.pth").exists()
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_2.pth")
    assert not list(out.glob("segment-*.json"))
