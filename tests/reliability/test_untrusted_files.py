"""A file that would run code when unpickled is refused by every load path - encoder files, `mimbench info`,
converters, training checkpoints (and --resume), feature caches, mmengine resume and the segmentation
backbone's Pretrained init - and the code never runs."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mimbench.errors import MimbenchError


class _RunsCode:
    """Unpickling this writes ``marker`` (stands for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _malicious(path, marker, wrap=lambda p: p):
    torch.save(wrap({"model": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}), path)
    return path


def _encoder_file(path):
    from mimbench.testing import write_tiny_encoder

    return write_tiny_encoder(path)


def _load_encoder(tmp_path, marker):
    from mimbench.encoders import load_encoder

    load_encoder(_malicious(tmp_path / "enc.safetensors", marker))


def _info_cli(tmp_path, marker):
    from typer.testing import CliRunner

    from mimbench.cli import app

    result = CliRunner().invoke(app, ["info", str(_malicious(tmp_path / "enc.safetensors", marker))])
    assert result.exit_code != 0 and "Traceback" not in result.output
    raise MimbenchError(result.output, "")


def _convert(tmp_path, marker):
    from mimbench.encoders.convert import convert_checkpoint

    convert_checkpoint(_malicious(tmp_path / "mae_pretrain_vit_base.pth", marker), tmp_path / "out.safetensors")


def _training_checkpoint(tmp_path, marker):
    from mimbench.engine import load_checkpoint

    load_checkpoint(_malicious(tmp_path / "checkpoint-latest.pt", marker))


def _pretrain_resume(tmp_path, marker):
    from pretrain.main import run_pretrain

    out = tmp_path / "run"
    out.mkdir()
    _malicious(out / "checkpoint-latest.pt", marker)
    run_pretrain(Path(__file__).resolve().parents[2] / "pretrain/configs/mae_micro_fmnist.py", out=out, resume=True, overrides=["data.limit=64"])


def _feature_cache(tmp_path, marker):
    """A planted .npy holding a pickled object array, under a manifest that matches: rebuilt, not read."""
    from mimbench.evals.features import extract_features

    enc = _encoder_file(tmp_path / "e.safetensors")
    cache = tmp_path / "cache"
    run = lambda: extract_features(enc, "builtin:fashion-mnist", "val", cache_dir=cache, limit=8)  # noqa: E731
    _, _, info = run()
    feats = cache / f"{info['key']}.features.npy"
    with open(feats, "wb") as fh:
        np.save(fh, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)
    again = run()
    assert not again[2]["cached"] and again[0].dtype == np.float32  # rebuilt from the encoder
    raise MimbenchError("planted cache was not read", "")


def _mmengine_resume(tmp_path, marker):
    import mimbench.seg  # noqa: F401  (installs the weights-only loader for local files)
    from mmengine.runner.checkpoint import _load_checkpoint

    try:
        _load_checkpoint(str(_malicious(tmp_path / "iter_2.pth", marker,
                                        lambda s: {"meta": {"iter": 2}, "state_dict": s["model"], "x": s["payload"]})),
                         map_location="cpu")
    except pickle.UnpicklingError as err:
        raise MimbenchError(str(err), "") from err


def _backbone_pretrained_init(tmp_path, marker):
    import mimbench.seg  # noqa: F401
    from mmengine.runner.checkpoint import CheckpointLoader

    try:
        CheckpointLoader.load_checkpoint(str(_malicious(tmp_path / "backbone_init.pth", marker)), map_location="cpu")
    except pickle.UnpicklingError as err:
        raise MimbenchError(str(err), "") from err


NOT_SAFETENSORS, WEIGHTS_ONLY = "not a readable safetensors file", "Weights only load failed"
PATHS = {"load_encoder": (_load_encoder, NOT_SAFETENSORS), "mimbench info": (_info_cli, NOT_SAFETENSORS),
         "mimbench convert": (_convert, "refused for safety"),
         "training checkpoint": (_training_checkpoint, WEIGHTS_ONLY), "pretrain --resume": (_pretrain_resume, WEIGHTS_ONLY),
         "feature cache": (_feature_cache, "planted cache was not read"),
         "mmengine resume": (_mmengine_resume, WEIGHTS_ONLY),
         "segmentation Pretrained init": (_backbone_pretrained_init, WEIGHTS_ONLY)}


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_code_in_a_pickle_never_runs(tmp_path, monkeypatch, path, force_unsafe_env):
    if force_unsafe_env:  # makes torch.load unsafe wherever a caller leaves weights_only unset
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    load, refusal = PATHS[path]
    with pytest.raises(MimbenchError, match=refusal):
        load(tmp_path, marker)
    assert not marker.exists(), f"{path} ran code from the file"
