"""Engine: schedule equals MAE's formula, atomic/corrupt checkpoints, exact resume, non-finite loss."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mimbench import engine
from mimbench.engine import LoopConfig, build_scheduler, fit, load_checkpoint, save_checkpoint
from mimbench.errors import MimbenchError


def mae_lr(epoch_f, lr, min_lr, warmup, epochs):
    """MAE's util/lr_sched.adjust_learning_rate, written out."""
    if epoch_f < warmup:
        return lr * epoch_f / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch_f - warmup) / (epochs - warmup)))


def test_scheduler_equals_mae_formula_and_honours_lr_scale():
    w = nn.Parameter(torch.zeros(1))
    v = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [v], "lr_scale": 0.5}], lr=1e-3)
    epochs, warm, ipe, min_lr = 10, 2, 7, 1e-6
    sched = build_scheduler(opt, epochs=epochs, warmup_epochs=warm, iters_per_epoch=ipe, min_lr=min_lr)
    for it in range(epochs * ipe):
        sched.step_update(it)
        ref = mae_lr(it / ipe, 1e-3, min_lr, warm, epochs)
        assert opt.param_groups[0]["lr"] == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * ref, rel=1e-9, abs=1e-15)


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    save_checkpoint(p, {"w": torch.ones(3), "epoch": 1})

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:  # torch.save receives the temporary file's path
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(engine.torch, "save", boom)
    with pytest.raises(MimbenchError, match="disk full"):
        save_checkpoint(p, {"w": torch.zeros(3), "epoch": 2})
    monkeypatch.undo()
    st = load_checkpoint(p)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.ones(3))
    assert [q.name for q in tmp_path.iterdir()] == ["ck.pt"]  # temp file cleaned up


def test_corrupt_checkpoint_raises_mimbench_error(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint(p, {"w": torch.ones(100)})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(MimbenchError, match="corrupt"):
        load_checkpoint(p)


def test_rng_state_roundtrip_weights_only(tmp_path):
    import random

    import numpy as np
    engine.seed_everything(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": engine.rng_state()})
    a = (random.random(), np.random.rand(), torch.rand(2))
    engine.set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, x):
        return self.f(x)


def _setup(seed=0):
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g))
    return net, opt, DataLoader(data, batch_size=4, shuffle=True)


def step(model, batch):
    x, y = batch
    loss = ((model(x) + 0.01 * torch.randn_like(y) - y) ** 2).mean()
    return loss, {"mse": loss.detach()}


class Killed(Exception):
    pass


def test_kill_and_resume_is_bit_exact(tmp_path):
    cfg = LoopConfig(epochs=4, warmup_epochs=1, accum_iter=2, clip_grad=1.0, log_every=2, progress=False)
    net, opt, loader = _setup()
    hist = fit(net, opt, loader, step, cfg, tmp_path / "full")
    assert len(hist) == 4

    net2, opt2, loader2 = _setup()

    def kill(it, total):
        if it == 7:  # inside epoch 3 (3 optimizer steps per epoch)
            raise Killed

    with pytest.raises(Killed):
        fit(net2, opt2, loader2, step, cfg, tmp_path / "part", on_step_end=kill)
    assert load_checkpoint(tmp_path / "part" / "checkpoint-latest.pt")["epoch"] == 2
    torch.manual_seed(123)  # a fresh process would have unrelated RNG state
    net3, opt3, loader3 = _setup(seed=5)
    fit(net3, opt3, loader3, step, cfg, tmp_path / "part", resume=True)
    for a, b in zip(net.state_dict().values(), net3.state_dict().values()):
        assert torch.equal(a, b)
    full = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    part = [json.loads(l) for l in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in full] == [r["it"] for r in part]
    assert [r["loss"] for r in full] == [r["loss"] for r in part]
    assert (tmp_path / "full" / "checkpoint-3.pt").is_file()


def test_resume_without_checkpoint_is_refused(tmp_path):
    net, opt, loader = _setup()
    with pytest.raises(MimbenchError, match="does not exist"):
        fit(net, opt, loader, step, LoopConfig(epochs=2, warmup_epochs=1, progress=False), tmp_path, resume=True)


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path):
    net, opt, loader = _setup()
    calls = {"n": 0}

    def bad_step(model, batch):
        calls["n"] += 1
        loss, terms = step(model, batch)
        if calls["n"] > 8:  # epoch 2, step 8 (6 steps per epoch)
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach()), "beta": 0.5}

    with pytest.raises(MimbenchError, match=r"optimizer step 8.*mse=nan, beta=0.5"):
        fit(net, opt, loader, bad_step, LoopConfig(epochs=3, warmup_epochs=1, progress=False), tmp_path)
    ck = load_checkpoint(tmp_path / "checkpoint-latest.pt")
    assert ck["epoch"] == 1
    net.load_state_dict(ck["model"])


def test_accumulation_matches_the_large_batch_step(tmp_path):
    """accum_iter=2 over batches of 4 takes the same optimizer steps (and lr) as batches of 8:
    the loss is divided by accum_iter, the step and the schedule advance every 2 micro-batches."""
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))

    def run(batch, accum, sub):
        torch.manual_seed(0)
        net = nn.Linear(4, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        loader = DataLoader(data, batch_size=batch, shuffle=False)

        def mse(model, b):
            x, y = b
            return ((model(x) - y) ** 2).mean(), {}

        cfg = LoopConfig(epochs=3, warmup_epochs=1, accum_iter=accum, log_every=1, progress=False)
        fit(net, opt, loader, mse, cfg, tmp_path / sub)
        logs = [json.loads(l) for l in (tmp_path / sub / "log.jsonl").read_text().splitlines()]
        return net, logs

    big, big_logs = run(8, 1, "big")
    small, small_logs = run(4, 2, "small")
    assert [r["it"] for r in big_logs] == [r["it"] for r in small_logs] == list(range(1, 13))
    assert [r["lr"] for r in big_logs] == pytest.approx([r["lr"] for r in small_logs], rel=1e-12)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(0)
    init = nn.Linear(4, 1)
    assert (big.weight - init.weight).abs().max() > 1e-3  # it trained
