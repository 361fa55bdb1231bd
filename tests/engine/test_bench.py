"""`mimbench bench`: every mode runs for a few steps on CPU and writes a valid bench record."""
import re

import pytest
import torch
from typer.testing import CliRunner

from mimbench.bench import count_flops, default_workers, run_bench
from mimbench.cli import app
from mimbench.errors import MimbenchError
from mimbench.results.records import load_records, validate_record

FAST_KEYS = {"img_per_s", "step_ms_median", "step_ms_min", "step_ms_max", "step_ms_iqr", "flops_per_img", "tflops"}


@pytest.fixture(scope="module")
def encoder4(dist_encoder):
    """A random-init ViT (embed 32, depth 4, 2 heads, patch 8, 32x32): deep enough for UperNet's 4 taps."""
    return dist_encoder


def _check(record, mode, compare):
    validate_record(record)
    m = record["metrics"]
    assert record["task"] == "bench" and record["protocol"]["mode"] == mode
    assert FAST_KEYS <= set(m)
    assert m["img_per_s"] > 0 and m["flops_per_img"] > 0
    assert m["step_ms_min"] <= m["step_ms_median"] <= m["step_ms_max"]
    assert record["protocol"]["precision"] in ("bf16", "none")
    if compare:
        assert m["plain_img_per_s"] > 0
        assert m["speedup"] == pytest.approx(m["img_per_s"] / m["plain_img_per_s"])
        if mode != "data":
            assert m["speedup_paired"] > 0
    else:
        assert "speedup" not in m


def test_bench_pretrain_with_compare(tmp_path):
    record = run_bench("pretrain", config="pretrain/configs/mae_micro_fmnist.py", steps=2, batch=4, warmup=1,
                       compare=True, out=tmp_path, peak_tflops=1.0)
    _check(record, "pretrain", compare=True)
    m = record["metrics"]
    assert m["mfu"] == pytest.approx(m["tflops"] / 1.0)
    assert record["protocol"]["model"] == "mae_vit_micro_patch4_32"
    table, skipped = load_records(tmp_path)  # the record sits beside run records and reads back
    assert not skipped and list(table["task"]) == ["bench"]


def test_bench_pretrain_ddae(tmp_path):
    record = run_bench("pretrain", config="pretrain/configs/ddae_micro_fmnist.py", steps=1, batch=4, warmup=0,
                       out=tmp_path)
    _check(record, "pretrain", compare=False)


@pytest.mark.parametrize("mode", ["features", "linear", "finetune"])
def test_bench_encoder_modes(tmp_path, encoder4, mode):
    record = run_bench(mode, encoder=encoder4, steps=2, batch=4, warmup=1, compare=mode == "features", out=tmp_path)
    _check(record, mode, compare=mode == "features")
    assert record["encoder"]["arch"] == "vit-test/8"


def test_bench_features_with_a_timm_arch(tmp_path):
    record = run_bench("features", arch="vit_tiny_patch16_224", steps=1, batch=2, warmup=0, out=tmp_path)
    _check(record, "features", compare=False)
    assert record["protocol"]["arch"] == "vit_tiny_patch16_224" and record["protocol"]["img_size"] == 224
    # ViT-Ti/16 at 224 (D=192, N=197 tokens, 12 blocks, MLP 4D), forward only: per block 12*D^2*N MACs in the
    # linear layers and 2*N^2*D in attention, plus the 196 x (768 -> 192) patch embedding; 2 FLOPs per MAC.
    d, n = 192, 197
    expected = 2 * (12 * (12 * d * d * n + 2 * n * n * d) + 196 * 768 * d)
    assert record["metrics"]["flops_per_img"] == pytest.approx(expected, rel=1e-3)


def test_bench_segment(tmp_path, encoder4):
    record = run_bench("segment", encoder=encoder4, steps=1, batch=2, warmup=1, compare=True, out=tmp_path)
    _check(record, "segment", compare=True)


@pytest.fixture
def image_tree(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                arr = torch.randint(0, 256, (40, 48, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(folder / f"{i}.jpg")
    return tmp_path / "imgs"


def test_bench_data(tmp_path, image_tree):
    record = run_bench("data", data=str(image_tree), steps=2, batch=4, warmup=1, workers=1, compare=True,
                       out=tmp_path / "out")
    validate_record(record)
    m = record["metrics"]
    assert m["workers"] == 1 and m["plain_workers"] == 0
    assert m["img_per_s_per_worker"] == pytest.approx(m["img_per_s"])
    assert record["dataset"]["sizes"] == {"train": 8}
    assert default_workers() >= 1


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_bench_bad_input(tmp_path):
    with pytest.raises(MimbenchError, match="Unknown bench mode"):
        run_bench("backward", out=tmp_path)
    with pytest.raises(MimbenchError, match="replaced"):
        run_bench("train", out=tmp_path)
    with pytest.raises(MimbenchError, match="--steps 0"):
        run_bench("pretrain", steps=0, out=tmp_path)
    with pytest.raises(MimbenchError, match="ImageFolder"):
        run_bench("data", data="builtin:fashion-mnist", out=tmp_path)
    with pytest.raises(MimbenchError, match="peak"):
        run_bench("pretrain", peak_tflops=0, out=tmp_path)


def test_bench_cli_prints_both_paths_and_the_ratio(tmp_path):
    result = CliRunner().invoke(app, ["bench", "pretrain", "--config", "pretrain/configs/mae_micro_fmnist.py",
                                      "--steps", "1", "--warmup", "0", "--batch", "2", "--compare",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"fast : [0-9.]+ img/s", result.output) and re.search(r"plain: [0-9.]+ img/s", result.output)
    assert re.search(r"ratio fast/plain: [0-9.]+x", result.output)
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
    old = CliRunner().invoke(app, ["bench", "train", "--preset", "mae_vit_tiny_patch4_32"])
    assert old.exit_code == 2 and "model.name=mae_vit_tiny_patch4_32" in old.output
