"""Resuming segmentation training loads mmengine checkpoints weights-only (mimbench.seg.checkpoint)."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import mimbench.seg  # noqa: F401  (installs the weights-only checkpoint loader)
from mimbench.testing import write_seg_encoder, write_seg_tree

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"


def _load(path):
    """The loading path of ``Runner.resume``/``Runner.load_checkpoint``."""
    from mmengine.runner.checkpoint import _load_checkpoint

    return _load_checkpoint(str(path), map_location="cpu")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import Runner

    from mimbench.evals.segment import run_segment

    enc, out = write_seg_encoder(tmp_path / "enc.safetensors"), tmp_path / "run"
    data = str(write_seg_tree(tmp_path / "seg", sizes=[(64, 64)]))
    common = ["default_hooks.checkpoint.interval=1", "default_hooks.checkpoint.max_keep_ckpts=-1",
              "train_dataloader.batch_size=2"]
    run_segment(encoder=enc, config=DEMO, data=data, out=out, overrides=common + ["train_cfg.max_iters=2"])
    work = out / "mmseg"
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_2.pth")
    first = {name: _digest(work / name) for name in ("iter_1.pth", "iter_2.pth")}

    resumed_at = []
    real_resume = Runner.resume

    def spy(self, filename, *args, **kwargs):
        real_resume(self, filename, *args, **kwargs)
        resumed_at.append((Path(filename).name, self.iter))

    monkeypatch.setattr(Runner, "resume", spy)
    record = run_segment(encoder=enc, config=DEMO, data=data, out=out,
                         overrides=common + ["train_cfg.max_iters=4"], resume=True)

    assert resumed_at == [("iter_2.pth", 2)]
    # A run from scratch would have rewritten iterations 1 and 2.
    assert {name: _digest(work / name) for name in first} == first
    assert (work / "iter_3.pth").is_file() and (work / "iter_4.pth").is_file()
    last = _load(work / "iter_4.pth")
    assert last["meta"]["iter"] == 4
    loss = last["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss) is HistoryBuffer and np.isfinite(loss.mean())
    records = {json.loads(p.read_text())["run_id"] for p in out.glob("segment-*.json")}
    assert len(records) == 2 and record["run_id"] in records
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0


def _mmengine_like_checkpoint():
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("mimbench-resume-test")
    hub.update_scalar("train/loss", np.float32(0.5))
    hub.update_scalar("train/loss", 0.25)
    hub.update_scalar("train/lr", np.float64(1e-3))
    hub.update_info("iter", 2)
    return {"meta": {"iter": 2, "seed": 0, "dataset_meta": {"classes": ("a", "b"), "palette": [[0, 0, 0], [1, 1, 1]]},
                     "step": np.int64(2)},
            "state_dict": {"w": torch.ones(2)},
            "message_hub": hub.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}


def test_mmengine_checkpoint_loads_weights_only_and_the_allow_list_stays_local(tmp_path):
    from mmengine.logging import HistoryBuffer

    path = tmp_path / "iter_2.pth"
    torch.save(_mmengine_like_checkpoint(), path)
    ckpt = _load(path)
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss) is HistoryBuffer
    assert loss.mean() == pytest.approx(0.375) and loss.current() == 0.25
    assert ckpt["meta"]["step"] == 2 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    # Outside mmengine's loader torch's own defaults still apply.
    with pytest.raises(pickle.UnpicklingError, match="not an allowed global"):
        torch.load(path)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class _Attr:
    """``getattr(obj, name)``, then ``result[key] = value`` for ``setitems`` (pickle's dict items)."""

    def __init__(self, obj, name, setitems=None):
        self.obj, self.name, self.setitems = obj, name, setitems

    def __reduce__(self):
        return getattr, (self.obj, self.name), None, None, iter((self.setitems or {}).items())


def _globals_poison(marker):
    """Writes into mmengine's history_buffer module namespace if ``getattr`` were allowed:
    ``HistoryBuffer.__init__.__globals__["MIMBENCH_POISON"] = marker`` (the same way a file could
    rebind any name that code calls later)."""
    from mmengine.logging import HistoryBuffer

    return _Attr(_Attr(HistoryBuffer, "__init__"), "__globals__", {"MIMBENCH_POISON": str(marker)})


@pytest.mark.parametrize("payload, refusal", [(_Exec, "GLOBAL exec"), (_globals_poison, "getattr")])
@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch, payload, refusal, force_unsafe_env):
    from mmengine.logging import history_buffer

    if force_unsafe_env:
        # Makes torch.load unsafe wherever the caller leaves weights_only unset.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = tmp_path / "iter_1.pth"
    torch.save({"meta": {"iter": 1}, "message_hub": {"x": payload(marker)}}, path)
    with pytest.raises(pickle.UnpicklingError, match=refusal):
        _load(path)
    assert not marker.exists() and not hasattr(history_buffer, "MIMBENCH_POISON")


def test_history_buffer_with_foreign_statistics_is_refused(tmp_path, monkeypatch):
    from mmengine.logging import HistoryBuffer

    registry = dict(HistoryBuffer._statistics_methods)
    buffer = HistoryBuffer([1.0], [1])
    state = {"max_length": 10, "_log_history": np.ones(1), "_count_history": np.ones(1),
             "statistics_methods": {"mean": np.ndarray}}
    monkeypatch.setattr(HistoryBuffer, "__getstate__", lambda self: dict(state))
    path = tmp_path / "iter_1.pth"
    torch.save({"message_hub": {"log_scalars": {"loss": buffer}}}, path)
    with pytest.raises(pickle.UnpicklingError, match="statistics methods other than HistoryBuffer's own"):
        _load(path)
    assert HistoryBuffer._statistics_methods == registry
