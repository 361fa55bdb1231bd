"""SIGKILL at a random optimizer step, resume from the mid-epoch checkpoint: the same weights, losses and
metrics as an uninterrupted run, bit for bit on CPU, and one run record."""
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimbench.engine import load_checkpoint
from mimbench.testing import assert_same_state, log_losses, write_seg_encoder, write_seg_tree, write_tiny_encoder

REPO = Path(__file__).resolve().parents[2]

# 256 images / batch 32 = 8 optimizer steps per epoch, 2 epochs; checkpoints after in-epoch steps 3 and 6 and at
# epoch ends. Kill steps whose last checkpoint is a mid-epoch one (the kill lands after the optimizer step and
# before that step's checkpoint).
MID_EPOCH_KILLS = [4, 5, 6, 7, 12, 13, 14, 15]
PRETRAIN_SET = ["data.limit=256", "optim.batch_size=32", "runtime.ckpt_every_steps=3", "runtime.log_every=1"]


def _pretrain_code(config: str, out, resume: bool, sets) -> str:
    return (f"from pretrain.main import run_pretrain\n"
            f"run_pretrain({config!r}, out={str(out)!r}, overrides={sets!r}, resume={resume})\n")


# every technique: MAE; robust MAE (EMA target statistics in buffers, updated in forward); DDAE (EMA teacher,
# learnable beta, persistent schedule progress); MAE+DDS (beta schedule kept outside the state dict)
TECHNIQUES = {
    "mae": ("pretrain/configs/mae_micro_fmnist.py", []),
    "robust-mae": ("pretrain/configs/robust-mae_tiny_fmnist.py", ["model.name='robust_mae_vit_micro_patch4_32'"]),
    "ddae": ("pretrain/configs/ddae_micro_fmnist.py", []),
    "mae+dds": ("eval_configs/reproduce/mae-dds_micro_fmnist.py", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_pretrain_killed_mid_epoch_resumes_bit_exact(tmp_path, killed_run, technique):
    from pretrain.main import run_pretrain

    config, extra = TECHNIQUES[technique]
    config, sets = str(REPO / config), PRETRAIN_SET + extra
    kill_at = random.Random(technique).choice(MID_EPOCH_KILLS)
    full, part = tmp_path / "full", tmp_path / "part"
    run_pretrain(config, out=full, overrides=sets)

    killed_run(_pretrain_code(config, part, resume=False, sets=sets), kill_at)
    ck = load_checkpoint(part / "checkpoint-latest.pt")
    assert ck["step_in_epoch"] > 0, f"kill at {kill_at}: the last checkpoint should be mid-epoch"
    assert not (part / "encoder.safetensors").exists()
    torch.manual_seed(12345)  # whatever RNG state the resuming process has
    run_pretrain(config, out=part, overrides=sets, resume=True)

    # The whole training state: student, EMA teacher, beta parameters / schedule buffers, optimizer moments.
    a, b = load_checkpoint(full / "checkpoint-latest.pt"), load_checkpoint(part / "checkpoint-latest.pt")
    assert_same_state(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert_same_state(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    assert_same_state(load_file(full / "encoder.safetensors"), load_file(part / "encoder.safetensors"))
    assert log_losses(full / "log.jsonl") == log_losses(part / "log.jsonl"), f"kill at {kill_at}"


EVALS = {
    # Protocol linear probe: a shuffling DataLoader with PIL RandomResizedCrop/flip drawing from the global RNG.
    "linear": ("run_linear", str(REPO / "eval_configs/demo/linear_fmnist.py"),
               ["mode='protocol'", "data.limit_train=256", "data.limit_val=64", "optim.batch_size=32",
                "schedule.epochs=2", "schedule.warmup_epochs=1", "runtime.ckpt_every_steps=3", "runtime.log_every=1"]),
    # Fine-tune: drop path, tensor flips/erasing (torch RNG) and Mixup/CutMix (NumPy RNG).
    "finetune": ("run_finetune", str(REPO / "eval_configs/demo/finetune_fmnist.py"),
                 ["data.limit_train=256", "data.limit_val=64", "optim.batch_size=32", "runtime.ckpt_every_steps=3",
                  "runtime.log_every=1"]),
}


def _eval_code(task, encoder, out, resume):
    fn, config, sets = EVALS[task]
    module = "linear" if task == "linear" else "finetune"
    return (f"from mimbench.evals.{module} import {fn}\n"
            f"{fn}(encoder={str(encoder)!r}, config={config!r}, data='builtin:fashion-mnist', out={str(out)!r}, "
            f"overrides={sets!r}, resume={resume})\n")


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(EVALS))
def test_evaluation_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path, killed_run, task):
    import mimbench.evals.finetune as ft
    import mimbench.evals.linear as lin

    encoder = write_tiny_encoder(tmp_path / "enc.safetensors")
    fn_name, config, sets = EVALS[task]
    fn = getattr(lin if task == "linear" else ft, fn_name)
    kill_at = random.Random(task).choice(MID_EPOCH_KILLS)
    full, part = tmp_path / "full", tmp_path / "part"
    ref = fn(encoder=encoder, config=config, data="builtin:fashion-mnist", out=full, overrides=sets)

    killed_run(_eval_code(task, encoder, part, resume=False), kill_at)
    assert load_checkpoint(part / "checkpoint-latest.pt")["step_in_epoch"] > 0
    assert not list(part.glob(f"{task}-*.json")), "a killed run must not leave a record"
    torch.manual_seed(999)
    got = fn(encoder=encoder, config=config, data="builtin:fashion-mnist", out=part, overrides=sets, resume=True)

    assert got["metrics"] == ref["metrics"], f"kill at {kill_at}"
    assert_same_state(load_checkpoint(full / "checkpoint-latest.pt")["model"],
                       load_checkpoint(part / "checkpoint-latest.pt")["model"])
    assert log_losses(full / "log.jsonl") == log_losses(part / "log.jsonl")
    assert len(list(part.glob(f"{task}-*.json"))) == 1


@pytest.mark.slow
def test_segmentation_killed_mid_run_resumes_bit_exact(tmp_path, killed_run):
    """UperNet through mmengine: checkpoints every 2 iterations carry the RNG state (mimbench.seg.resume)."""
    import mimbench.seg  # noqa: F401  (weights-only checkpoint loading)
    from mmengine.runner.checkpoint import _load_checkpoint

    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    root = write_seg_tree(tmp_path / "seg", n=6)
    config = str(REPO / "eval_configs/segmentation/demo_fmnist_seg.py")
    sets = ["default_hooks.checkpoint.interval=2", "default_hooks.checkpoint.max_keep_ckpts=-1",
            "train_dataloader.batch_size=2", "train_cfg.max_iters=6"]
    full, part = tmp_path / "full", tmp_path / "part"
    ref = run_segment(encoder=enc, config=config, data=str(root), out=full, overrides=sets)
    kill_at = random.Random("segment").choice([3, 5])

    code = (f"from mimbench.evals.segment import run_segment\n"
            f"run_segment(encoder={str(enc)!r}, config={config!r}, data={str(root)!r}, out={str(part)!r}, "
            f"overrides={sets!r}, resume=RESUME)\n")
    killed_run(code.replace("RESUME", "False"), kill_at)
    assert not list(part.glob("segment-*.json"))
    got = run_segment(encoder=enc, config=config, data=str(root), out=part, overrides=sets, resume=True)

    assert got["metrics"] == ref["metrics"], f"kill at {kill_at}"
    a = _load_checkpoint(str(full / "mmseg" / "iter_6.pth"), map_location="cpu")
    b = _load_checkpoint(str(part / "mmseg" / "iter_6.pth"), map_location="cpu")
    assert_same_state(a["state_dict"], b["state_dict"])
    assert len(list(part.glob("segment-*.json"))) == 1


class _CountingSet(torch.utils.data.Dataset):
    """Random-augmented samples (global torch RNG) that count how often each index is loaded."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
        self.loads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads.append(i)
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class _Stop(Exception):
    pass


def test_mid_epoch_resume_skips_batches_without_loading_them(tmp_path):
    from mimbench.engine import LoopConfig, fit

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        ds = _CountingSet()
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2), ds, torch.utils.data.DataLoader(
            ds, batch_size=4, shuffle=True)

    def step(model, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"mse": loss.detach()}

    # 10 micro-batches / accum 2 = 5 optimizer steps per epoch; checkpoints after in-epoch steps 2 and 4
    cfg = LoopConfig(epochs=2, warmup_epochs=1, accum_iter=2, ckpt_every_steps=2, log_every=1, progress=False)
    net, opt, _, loader = setup()
    fit(net, opt, loader, step, cfg, tmp_path / "full")

    net2, opt2, _, loader2 = setup()

    def stop(it, total):
        if it == 8:  # epoch 2, in-epoch step 4 done (0-based it 8); the step-4 checkpoint is not written yet
            raise _Stop

    with pytest.raises(_Stop):
        fit(net2, opt2, loader2, step, cfg, tmp_path / "part", on_step_end=stop)
    ck = load_checkpoint(tmp_path / "part" / "checkpoint-latest.pt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 2)

    torch.manual_seed(77)
    net3, opt3, ds3, loader3 = setup()
    fit(net3, opt3, loader3, step, cfg, tmp_path / "part", resume=True)
    assert_same_state(net.state_dict(), net3.state_dict())
    assert log_losses(tmp_path / "full" / "log.jsonl") == log_losses(tmp_path / "part" / "log.jsonl")
    # 2 steps x 2 micro-batches x 4 images were skipped: only the other 6 micro-batches were read
    assert len(ds3.loads) == (10 - 4) * 4
