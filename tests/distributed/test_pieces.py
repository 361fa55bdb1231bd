"""Single-process checks of the pieces that make N processes compute what one does (and of the loop's logs)."""
import io
import sys

import pytest
import torch

from mimbench.batching import (GlobalBatchSampler, SeededItems, item_seed, resolve_batch, scaled_lr, shard_range,
                               uniform_by_index)
from mimbench.errors import MimbenchError


def test_resolve_batch_rule_and_error_names_everything():
    assert resolve_batch({"batch_size": 64, "accum_iter": 2}, 4) == (64, 2, 512)
    assert resolve_batch({"batch_size": 64, "eff_batch_size": 4096}, 8) == (64, 8, 4096)
    assert resolve_batch({"batch_size": 64, "eff_batch_size": 4096}, 64) == (64, 1, 4096)
    with pytest.raises(MimbenchError) as err:
        resolve_batch({"batch_size": 64, "eff_batch_size": 4096}, 3)
    assert "optim.eff_batch_size=4096" in err.value.problem and "optim.batch_size=64" in err.value.problem
    assert "world size 3" in err.value.problem
    assert scaled_lr({"blr": 1e-3}, 4096) == pytest.approx(0.016) and scaled_lr({"lr": 0.5, "blr": 1.0}, 4096) == 0.5


@pytest.mark.parametrize("world,accum", [(4, 1), (2, 2), (1, 4)])
def test_global_batches_are_the_same_chunks_on_any_process_count(world, accum):
    """Step t's images, cut into micro-batches of 4, equal those of one process accumulating 4 of them."""
    n, micro, eff = 70, 4, 16
    ref = GlobalBatchSampler(n, micro, eff // micro, seed=3)
    ref.set_epoch(5)
    ref_chunks = list(ref)
    ranks = [GlobalBatchSampler(n, micro, accum, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in ranks:
        s.set_epoch(5)
    per_rank = [list(s) for s in ranks]
    assert len(ref_chunks) == 4 * 4 and all(len(p) == 4 * accum for p in per_rank)
    for t in range(4):  # rank r's k-th micro-batch of step t is chunk r * accum + k
        for r in range(world):
            for k in range(accum):
                assert per_rank[r][t * accum + k] == ref_chunks[t * 4 + r * accum + k]
    assert len({i for c in ref_chunks for i in c}) == 64  # no image twice in an epoch; 6 left over
    other = GlobalBatchSampler(n, micro, 4, seed=3)
    other.set_epoch(6)
    assert list(other) != ref_chunks


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3)])
def test_global_batches_start_at_any_micro_batch(world, accum):
    """A mid-epoch resume starts at micro-batch k: the rest of the epoch is the same chunks, in order."""
    from mimbench.engine import resume_from
    from mimbench.evals.runner import TensorBatches

    for r in range(world):
        s = GlobalBatchSampler(100, 4, accum, seed=1, rank=r, world_size=world, with_epoch=True)
        s.set_epoch(2)
        whole = list(s)
        assert all(list(s.iter_from(k)) == whole[k:] for k in range(len(whole) + 1))
    loader = torch.utils.data.DataLoader(SeededItems(torch.utils.data.TensorDataset(torch.arange(100)), 1),
                                         batch_sampler=GlobalBatchSampler(100, 4, accum, seed=1, with_epoch=True))
    whole = [b[1].tolist() for b in loader]
    assert [b[1].tolist() for b in resume_from(loader, 5)] == whole[5:]

    class Run:  # what TensorBatches reads of an evaluation run
        seed, rank, world_size = 1, 0, 1

    batches = TensorBatches(Run(), torch.arange(100.0), torch.arange(100), 4, accum)
    whole = [b[2].tolist() for b in batches]
    assert [b[2].tolist() for b in resume_from(batches, 3)] == whole[3:]


def test_shards_partition_the_evaluation_set():
    for n in (0, 1, 7, 200):
        for world in (1, 2, 3, 8):
            parts = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))


def test_per_image_numbers_depend_on_seed_epoch_index_only():
    idx = torch.tensor([5, 9, 1000])
    a = uniform_by_index(0, 2, idx, 64, "mask")
    assert a.shape == (3, 64) and a.dtype == torch.float32 and ((a >= 0) & (a < 1)).all()
    assert torch.equal(uniform_by_index(0, 2, torch.tensor([1000, 5]), 64, "mask"), a[[2, 0]])  # not the batch
    for other in (uniform_by_index(1, 2, idx, 64, "mask"), uniform_by_index(0, 3, idx, 64, "mask"),
                  uniform_by_index(0, 2, idx, 64, "crop")):
        assert not torch.equal(other, a)
    many = uniform_by_index(7, 0, torch.arange(2000), 50, "mask")
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.std()) - (1 / 12) ** 0.5) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([many[:, 0], many[:, 1]]))[0, 1])) < 0.05
    noise = many.argsort(1)  # MAE keeps the lowest-noise patches: every ordering equally likely
    assert abs(float((noise[:, 0] < 25).float().mean()) - 0.5) < 0.05


def test_per_image_seeds_are_pinned_and_match_the_tensor_hash():
    # Values of the first (tensor-per-call) implementation: a run resumed or repeated with a newer
    # version draws the same masks, crops and batches.
    assert [item_seed(0, 0, 0, "item"), item_seed(3, 7, 12345, "mask"), item_seed(2**32 + 5, 1, 2**33 + 1, "batch")] \
        == [2923814113, 1589025036, 3568034210]
    # The per-image seed and the per-index tensor numbers mix the same (seed, epoch, stream) key
    idx = torch.tensor([0, 1, 77, 2**31 + 3])
    from mimbench import batching
    key = batching._key(4, 9, "crop")
    assert [item_seed(4, 9, int(i), "crop") for i in idx] == batching._hash32(idx + key).tolist()


def test_seeded_items_draw_per_image_and_leave_the_callers_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3), i

    ds = SeededItems(Noisy(), seed=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x1, y1, i1 = ds[(4, 7)]
    assert torch.equal(torch.get_rng_state(), before) and (y1, i1) == (7, 7)
    assert torch.equal(ds[(4, 7)][0], x1) and not torch.equal(ds[(5, 7)][0], x1) and not torch.equal(ds[(4, 8)][0], x1)


def test_step_batch_norm_replays_what_batchnorm_does_one_process():
    """One process: the running statistics after commit equal torch's BatchNorm1d updated per micro-batch."""
    from mimbench.evals.linear import StepBatchNorm1d

    torch.manual_seed(0)
    ours, ref = StepBatchNorm1d(6), torch.nn.BatchNorm1d(6, affine=False, eps=1e-6)
    for _ in range(3):  # three optimizer steps of two micro-batches
        for _ in range(2):
            x = torch.randn(16, 6) * 3 + 1
            assert torch.allclose(ours(x), ref(x), atol=1e-5)
        ours.commit()
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 6
    ours.eval(), ref.eval()
    x = torch.randn(5, 6)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert set(ours.state_dict()) == set(ref.state_dict())


def _tiny_fit(tmp_path, model, **loop):
    from mimbench.engine import LoopConfig, fit

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1]), {}

    return fit(model, opt, loader, step, LoopConfig(epochs=2, warmup_epochs=1, **loop), tmp_path)


def test_training_refuses_a_model_off_the_process_device(tmp_path):
    """The loop checks every parameter is on this process's device before DDP could wrap it."""
    model = torch.nn.Linear(4, 3).to("meta")
    with pytest.raises(MimbenchError, match="is on meta, this process's device is cpu"):
        _tiny_fit(tmp_path, model)


def test_plain_log_lines_when_not_a_terminal(tmp_path, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    torch.manual_seed(0)
    _tiny_fit(tmp_path, torch.nn.Linear(4, 3), log_every=4)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4  # steps 4, 8 (end of epoch 1), 12, 16
    assert lines[-1].startswith("train: step 16/16 epoch 2.00 loss ") and " lr " in lines[-1]
    assert " img/s " in lines[-1] and lines[-1].endswith("eta 0:00:00")
    buf.truncate(0)
    _tiny_fit(tmp_path, torch.nn.Linear(4, 3), log_every=4, progress=False)
    assert buf.getvalue() == ""


def test_tensorboard_is_optional(tmp_path):
    """tensorboard=True writes event files through mmengine's backend, or says how to install it."""
    import importlib.util

    torch.manual_seed(0)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(MimbenchError, match="needs the tensorboard package") as err:
            _tiny_fit(tmp_path, torch.nn.Linear(4, 3), tensorboard=True, progress=False)
        assert "pip install tensorboard" in err.value.fix
    else:
        _tiny_fit(tmp_path, torch.nn.Linear(4, 3), tensorboard=True, progress=False)
        assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    _tiny_fit(tmp_path / "off", torch.nn.Linear(4, 3), progress=False)
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_segment_is_an_evaluation_task(tmp_path, dist_encoder):
    """run_eval reaches segmentation like the other tasks (here stopped by a data root of the wrong layout)."""
    from mimbench.evals import TASKS, run_eval

    assert set(TASKS) == {"knn", "linear", "finetune", "segment", "attentive", "lowshot", "robustness"}
    enc = dist_encoder
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimbenchError, match="ADE20K-layout"):
        run_eval("segment", encoder=enc, config="eval_configs/segmentation/demo_fmnist_seg.py",
                 data=str(tmp_path / "empty"), out=tmp_path / "run", aug_test=False)


def test_folder_pretrain_loader_gives_each_image_the_same_crop_on_any_process_count(tmp_path):
    """ImageNet-style folder: 1 process at batch 4 = ranks 0 and 1 at batch 2 (same images, same crops/flips)."""
    import numpy as np
    from PIL import Image

    from pretrain.data import build_pretrain_loader

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    mk = lambda **kw: build_pretrain_loader(str(tmp_path), img_size=16, seed=5, **kw)
    one, r0, r1 = mk(batch_size=4), mk(batch_size=2, rank=0, world_size=2), mk(batch_size=2, rank=1, world_size=2)
    for loader in (one, r0, r1):
        loader.batch_sampler.set_epoch(1)
    ref = list(one)
    two = [(torch.cat([a[0], b[0]]), torch.cat([a[2], b[2]])) for a, b in zip(r0, r1)]
    assert len(ref) == len(two) == 3
    for (x, _, idx), (x2, idx2) in zip(ref, two):
        assert torch.equal(idx, idx2) and torch.equal(x, x2)
    one.batch_sampler.set_epoch(2)
    assert not torch.equal(next(iter(one))[0], ref[0][0])
