import pytest
import torch

from mimbench.config import load_config
from mimbench.encoders import load_encoder
from mimbench.evals import run_eval
from mimbench.evals.linear import CACHED_DEVIATION, build_head, build_optimizer


def test_protocol_config_values():
    # facebookresearch/mae FINETUNE.md "Linear Probing" / main_linprobe.py
    cfg = load_config("eval_configs/linear/mae_vit-b_in1k.py")
    assert cfg.mode == "protocol" and cfg.img_size == 224
    assert (cfg.optim.name, cfg.optim.blr, cfg.optim.momentum, cfg.optim.trust_coeff, cfg.optim.weight_decay) == \
        ("lars", 0.1, 0.9, 0.001, 0.0)
    assert cfg.optim.eff_batch_size == 16384 and cfg.optim.batch_size == 512
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == (90, 10, 0.0)
    large = load_config("eval_configs/linear/mae_vit-l_in1k.py")
    assert large.schedule.epochs == 50 and large.optim.blr == 0.1
    huge = load_config("eval_configs/linear/mae_vit-h_in1k.py")
    assert (huge.schedule.epochs, huge.schedule.warmup_epochs, huge.optim.blr, huge.optim.eff_batch_size) == \
        (50, 10, 0.1, 16384)
    assert load_config("eval_configs/linear/fast_cached.py").mode == "cached"


def test_head_and_lars_match_mae():
    torch.manual_seed(0)
    head = build_head(16, 5)
    bn, fc = head
    assert not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert fc.bias.abs().sum() == 0 and 0.005 < fc.weight.std() < 0.015
    opt = build_optimizer(head, {"name": "lars", "momentum": 0.9, "trust_coeff": 0.001, "weight_decay": 0.0}, lr=6.4)
    w0, b0 = fc.weight.detach().clone(), fc.bias.detach().clone()
    x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
    torch.nn.functional.cross_entropy(head(x), y).backward()
    gw, gb = fc.weight.grad.clone(), fc.bias.grad.clone()
    opt.step()
    # MAE's LARS, first step: matrices scaled by 0.001*|w|/|g|, 1-D params plain SGD (momentum buffer = update)
    assert torch.allclose(fc.weight, w0 - 6.4 * gw * (0.001 * w0.norm() / gw.norm()), atol=1e-7)
    assert torch.allclose(fc.bias, b0 - 6.4 * gb, atol=1e-7)


def test_protocol_mode_keeps_encoder_bit_identical(tiny_encoder, tmp_path, monkeypatch):
    import mimbench.encoders
    import mimbench.evals.linear as lin

    before = {k: v.clone() for k, v in load_encoder(tiny_encoder).state_dict().items()}
    captured = {}
    orig_opt, orig_load = lin.build_optimizer, mimbench.encoders.load_encoder

    def spy_opt(head, optim, lr):
        captured["head"] = head
        return orig_opt(head, optim, lr)

    def spy_load(*args, **kwargs):
        captured["encoder"] = orig_load(*args, **kwargs)
        return captured["encoder"]

    monkeypatch.setattr(lin, "build_optimizer", spy_opt)
    monkeypatch.setattr(mimbench.encoders, "load_encoder", spy_load)
    record = run_eval("linear", encoder=tiny_encoder, config="eval_configs/linear/mae_vit-b_in1k.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["img_size=32", "optim.batch_size=8", "optim.eff_batch_size=16",
                                 "schedule.epochs=2", "schedule.warmup_epochs=1", "data.limit_train=32",
                                 "data.limit_val=16", "data.num_workers=0", "runtime.progress=False",
                                 "runtime.ckpt_every=0"])
    assert record["protocol"]["accum_iter"] == 2 and record["protocol"]["lr"] == pytest.approx(0.1 * 16 / 256)
    assert record["protocol"]["deviations"] == []
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    # the training really changed the head (bias starts at 0), while the encoder in use stayed bit-identical
    fc = captured["head"][1]
    assert fc.bias.abs().max() > 0
    assert not captured["encoder"].training
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)
    assert set(ck["model"]) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    after = captured["encoder"].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cached_mode_records_deviation(tiny_encoder, tmp_path):
    record = run_eval("linear", encoder=tiny_encoder, config="eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=256", "data.limit_val=64", "optim.batch_size=64",
                                 "schedule.epochs=3", "schedule.warmup_epochs=1"])
    assert record["task"] == "linear" and record["protocol"]["deviations"][0] == CACHED_DEVIATION
    assert record["dataset"]["sizes"] == {"train": 256, "val": 64}
    assert record["metrics"]["train_loss"] < 2.28  # below chance-level cross-entropy ln(10) = 2.30: the head learned
    assert len(list(tmp_path.glob("*.json"))) == 1
