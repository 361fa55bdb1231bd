"""Pre-training pipeline: tensor augmentation geometry, data order, optimizer groups, run_pretrain."""
import json
import os

import pytest
import torch

from mimbench.errors import MimbenchError
from pretrain.data import TensorPretrainLoader, crop_resize_flip, random_resized_crop_boxes
from pretrain.main import build_optimizer, resolve_batch

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain", "configs")


def test_crop_resize_flip_geometry():
    x = torch.rand(2, 3, 12, 12)
    full = torch.tensor([[0, 0, 12, 12]] * 2)
    same = crop_resize_flip(x, full, torch.tensor([False, True]), 12)
    assert torch.allclose(same[0], x[0], atol=1e-5)
    assert torch.allclose(same[1], x[1].flip(-1), atol=1e-5)
    # A crop resized up: pixels whose bicubic taps stay inside the box equal crop-then-resize
    # (at the box edge the batched sampler reads the real neighbours instead of replicating the edge).
    box = torch.tensor([[2, 3, 6, 6], [0, 0, 12, 12]])  # top, left, h, w
    crop = crop_resize_flip(x, box, torch.tensor([False, False]), 12)
    ref = torch.nn.functional.interpolate(x[:1, :, 2:8, 3:9], size=(12, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(crop[0, :, 4:8, 4:8], ref[0, :, 4:8, 4:8], atol=1e-5)
    assert not torch.allclose(crop[0], x[0])


def test_crop_boxes_follow_scale_and_bounds():
    g = torch.Generator().manual_seed(0)
    b = random_resized_crop_boxes(4000, 28, 28, g)
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).float() / 784
    assert area.min() >= 0.17 and area.max() <= 1.0 and 0.5 < area.mean() < 0.7  # uniform on (0.2, 1) ~ 0.6


def test_tensor_loader_order_is_a_function_of_seed_and_epoch():
    imgs = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    mk = lambda **kw: TensorPretrainLoader(imgs, torch.arange(40), img_size=32,
                                           mean=(0.5,), std=(0.25,), seed=1, **{"batch_size": 8, **kw})
    a, b = mk(), mk()
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ya)  # labels here = indices
    assert xa.shape == (8, 3, 32, 32) and len(a) == 5
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])
    r0, r1 = mk(rank=0, world_size=2, batch_size=4), mk(rank=1, world_size=2, batch_size=4)
    for r in (r0, r1):
        r.set_epoch(3)
    seen0 = torch.cat([y for _, y, _ in r0])
    seen1 = torch.cat([y for _, y, _ in r1])
    assert len(r0) == 5 and not set(seen0.tolist()) & set(seen1.tolist())


def test_tensor_loader_images_do_not_depend_on_the_process_count():
    """Batch 8 on one process = batch 4 on each of two processes (or accumulated twice on one):
    the same images, the same crops and flips, in the same global steps."""
    imgs = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    mk = lambda **kw: TensorPretrainLoader(imgs, torch.arange(40), img_size=32, mean=(0.5,), std=(0.25,), seed=1, **kw)
    one = mk(batch_size=8)
    accum = mk(batch_size=4, accum_iter=2)
    r0, r1 = mk(batch_size=4, rank=0, world_size=2), mk(batch_size=4, rank=1, world_size=2)
    for loader in (one, accum, r0, r1):
        loader.set_epoch(2)
    two = [torch.cat([a[0], b[0]]) for a, b in zip(r0, r1)]
    acc = list(accum)
    acc = [torch.cat([acc[i][0], acc[i + 1][0]]) for i in range(0, len(acc), 2)]
    ref = [x for x, _, _ in one]
    assert len(ref) == len(two) == len(acc) == 5
    for x, y, z in zip(ref, two, acc):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_optimizer_groups_exclude_1d_named_and_frozen_params():
    from pretrain import create_model

    model = create_model("ddae_vit_micro_patch4_32")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token"} <= no_decay and "pos_embed" not in decay  # pos_embed: fixed sin-cos
    assert "blocks.0.attn.qkv.weight" in decay and "blocks.0.attn.qkv.bias" in no_decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and len(trainable) < len(ids)  # the frozen teacher is left out
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_resolve_batch():
    assert resolve_batch({"batch_size": 64, "accum_iter": 2}, 4) == (64, 2, 512)
    assert resolve_batch({"batch_size": 64, "accum_iter": 1, "eff_batch_size": 4096}, 8) == (64, 8, 4096)
    with pytest.raises(MimbenchError, match="not a multiple"):
        resolve_batch({"batch_size": 64, "eff_batch_size": 4096}, 3)


def test_run_pretrain_errors(tmp_path):
    from pretrain.main import run_pretrain

    cfg = os.path.join(CONFIGS, "mae_micro_fmnist.py")
    with pytest.raises(MimbenchError, match="does not exist"):
        run_pretrain(cfg, out=tmp_path / "fresh", resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MimbenchError, match="not writable"):
        run_pretrain(cfg, out=blocker / "sub")


def test_run_pretrain_micro_exports_loadable_encoder(tmp_path):
    pytest.importorskip("mimbench.data")
    from mimbench.encoders import load_encoder, read_metadata
    from pretrain.main import run_pretrain

    path = run_pretrain(os.path.join(CONFIGS, "mae_micro_fmnist.py"), out=tmp_path,
                        overrides=["schedule.epochs=3", "runtime.log_every=2", "data.limit=320"])
    enc = load_encoder(path)
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    meta = read_metadata(path)
    assert meta["technique"] == "mae" and float(meta["epochs"]) == 3 and meta["data"] == "builtin:fashion-mnist"
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in logs[:3]) / 3, sum(r["loss"] for r in logs[-3:]) / 3
    assert last < first and "loss_rec" in logs[-1]["terms"] and logs[-1]["img_per_s"] > 0
    # a real checkpoint holds only tensors and primitives: plain weights-only torch.load reads it
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)
    assert ck["epoch"] == 3 and {"model", "optimizer", "rng"} <= ck.keys()
    assert (tmp_path / "config.py").is_file()


@pytest.mark.slow
def test_run_pretrain_ddae_resume_from_epoch_checkpoint_is_exact(tmp_path):
    """Resuming a DDAE run (EMA teacher, beta schedule) from epoch 1 reproduces the uninterrupted run."""
    pytest.importorskip("mimbench.data")
    import shutil

    from safetensors.torch import load_file

    from pretrain.main import run_pretrain

    cfg = os.path.join(CONFIGS, "ddae_micro_fmnist.py")
    over = ["schedule.epochs=2", "runtime.ckpt_every=1", "data.limit=128"]
    full = run_pretrain(cfg, out=tmp_path / "a", overrides=over)
    run_pretrain(cfg, out=tmp_path / "b", overrides=over)
    shutil.copy(tmp_path / "b" / "checkpoint-1.pt", tmp_path / "b" / "checkpoint-latest.pt")
    torch.manual_seed(99)
    resumed = run_pretrain(cfg, out=tmp_path / "b", overrides=over, resume=True)
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_micro_config_loss_falls_over_a_few_hundred_steps(tmp_path):
    """300 optimizer steps of the micro MAE config: the reconstruction loss clearly falls."""
    pytest.importorskip("mimbench.data")
    from pretrain.main import run_pretrain

    run_pretrain(os.path.join(CONFIGS, "mae_micro_fmnist.py"), out=tmp_path,
                 overrides=["schedule.epochs=3", "runtime.log_every=10", "data.limit=3200"])
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["it"] == 300
    first, last = (sum(r["loss"] for r in logs[i:i + 5]) / 5 for i in (0, len(logs) - 5))
    assert last < 0.8 * first
