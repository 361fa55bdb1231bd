"""The evaluation data of a segmentation run is defined once: validation (during and at the end of training)
and test read the same loader and metric, whichever of the two a --set names; the final validation's metrics
are the test's; both run under the training's precision."""
from pathlib import Path

import pytest

import mimbench.seg  # noqa: F401
from mimbench.config import load_config
from mimbench.errors import MimbenchError
from mimbench.testing import write_seg_encoder, write_seg_tree

REPO = Path(__file__).resolve().parents[2]
ADE = REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"


class _Built(Exception):
    """Raised in place of building mmengine's Runner: the test only needs the config it would get."""


def _runner_cfg(tmp_path, monkeypatch, overrides, *, cuda=False):
    """The config ``run_segment`` hands to ``Runner.from_cfg`` for the ADE20K ViT-B protocol on a small tree
    (with ``cuda``: as configured on a machine with CUDA - AMP kept)."""
    from mmengine.runner import Runner

    from mimbench.evals import segment

    captured = {}

    def capture(cfg):
        captured["cfg"] = cfg
        raise _Built

    monkeypatch.setattr(Runner, "from_cfg", staticmethod(capture))
    if cuda:
        real = segment.fit_config
        monkeypatch.setattr(segment, "fit_config", lambda run, root, crop, launcher, _: real(run, root, crop, launcher, True))
    data = write_seg_tree(tmp_path / "ADEChallengeData2016", n=2, sizes=[(48, 64)], num_classes=151)
    crop = ["crop_size=(64, 64)", "model.data_preprocessor.size=(64, 64)", "model.data_preprocessor.test_cfg.size=(64, 64)",
            "model.test_cfg.crop_size=(64, 64)"]
    with pytest.raises(_Built):
        segment.run_segment(encoder=write_seg_encoder(tmp_path / "enc.safetensors"), config=ADE, data=str(data), out=tmp_path / "run",
                            overrides=crop + list(overrides), aug_test=False)
    return captured["cfg"], data


@pytest.mark.parametrize("cuda", [False, True])
def test_an_override_of_either_loader_reaches_validation_and_test(tmp_path, monkeypatch, cuda):
    cfg, data = _runner_cfg(tmp_path, monkeypatch, ["test_dataloader.dataset.pipeline.1.scale=(256, 64)",
                                                    "val_dataloader.num_workers=0",
                                                    "val_dataloader.persistent_workers=False"], cuda=cuda)
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        assert tuple(loader.dataset.pipeline[1].scale) == (256, 64)
        assert loader.num_workers == 0 and loader.persistent_workers is False
        assert loader.dataset.data_root == str(data)
    assert cfg.val_dataloader.to_dict() == cfg.test_dataloader.to_dict()
    assert cfg.val_evaluator.to_dict() == cfg.test_evaluator.to_dict()
    assert cfg.val_evaluator.type == "PerClassIoUMetric"  # the test's metric, so the final validation can stand for it
    assert "FinalValidationHook" in [h["type"] for h in cfg.custom_hooks]
    # validation and test compute in the training's precision: fp16 AMP on CUDA, fp32 where AMP fell back
    assert cfg.optim_wrapper.type == ("AmpOptimWrapper" if cuda else "OptimWrapper")
    assert cfg.val_cfg.fp16 is cuda and cfg.test_cfg.fp16 is cuda


def test_overrides_of_the_two_copies_apply_in_order():
    from mimbench.evals.segment import share_eval_data

    test_first = ["test_dataloader.dataset.pipeline.1.scale=(10, 10)", "val_dataloader.dataset.pipeline.1.scale=(20, 20)"]
    for overrides, expected in ((test_first, (20, 20)), (test_first[::-1], (10, 10))):
        cfg = load_config(ADE, overrides, kind="segment")
        share_eval_data(cfg, overrides)
        assert tuple(cfg.val_dataloader.dataset.pipeline[1].scale) == expected
        assert tuple(cfg.test_dataloader.dataset.pipeline[1].scale) == expected


def test_a_config_with_two_different_evaluation_sets_is_refused(tmp_path):
    from mimbench.evals.segment import share_eval_data

    config = tmp_path / "two_sets.py"
    config.write_text(f"_base_ = [{str(ADE)!r}]\nval_dataloader = dict(batch_size=4)\n")
    cfg = load_config(config, kind="segment")
    with pytest.raises(MimbenchError, match="val_dataloader = test_dataloader"):
        share_eval_data(cfg, [])


def test_eval_precision_follows_the_optimizer_wrapper():
    from mimbench.evals.segment import match_eval_precision

    cfg = load_config(ADE, kind="segment")
    assert match_eval_precision(cfg) == "fp16" and cfg.val_cfg.fp16 is True and cfg.test_cfg.fp16 is True
    cfg.optim_wrapper.dtype = "bfloat16"  # mmengine's loops autocast to fp16 only: bf16 training is tested in fp32
    assert match_eval_precision(cfg) == "none" and cfg.val_cfg.fp16 is False and cfg.test_cfg.fp16 is False


def test_the_final_validation_is_the_test_and_runs_once(tmp_path, monkeypatch):
    """The demo config with validation at the end of training: the record holds the final validation's metrics,
    equal to a test of the same model, and the test loop does not run again."""
    from mmengine.runner import Runner

    from mimbench.evals.segment import run_segment
    from mimbench.seg.metrics import FinalValidationHook

    config = tmp_path / "with_validation.py"
    text = DEMO.read_text()
    for old, new in (("val_dataloader = None", "val_dataloader = test_dataloader"),
                     ("val_evaluator = None", "val_evaluator = test_evaluator"), ("val_cfg = None", "val_cfg = dict(type='ValLoop')")):
        assert old in text
        text = text.replace(old, new)
    config.write_text(text)
    enc, data = write_seg_encoder(tmp_path / "enc.safetensors"), str(write_seg_tree(tmp_path / "fmseg", n=2, sizes=[(48, 64)]))
    common = ["train_cfg.max_iters=2", "train_dataloader.batch_size=2"]
    seen = {}
    real = FinalValidationHook.metrics_of

    def kept_and_tested(runner):
        seen["kept"], seen["test"] = real(runner), runner.test()
        return seen["kept"]

    monkeypatch.setattr(FinalValidationHook, "metrics_of", staticmethod(kept_and_tested))
    first = run_segment(encoder=enc, config=config, data=data, out=tmp_path / "a", overrides=common, aug_test=False)
    assert seen["kept"] is not None and seen["kept"] == seen["test"]
    assert first["metrics"]["mIoU"] == pytest.approx(float(seen["kept"]["mIoU"]))
    monkeypatch.undo()
    tests = []
    monkeypatch.setattr(Runner, "test", lambda self: tests.append(1) or {})
    again = run_segment(encoder=enc, config=config, data=data, out=tmp_path / "b", overrides=common, aug_test=False)
    assert tests == [] and again["metrics"] == first["metrics"]
