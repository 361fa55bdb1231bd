"""The loader rule, JPEG decode-time downscaling (data.decode_draft) and `mimbench bench data`'s protocol table."""
import pytest
import torch
from PIL import Image

from mimbench.bench import format_bench, protocol_transforms, run_bench
from mimbench.data import build_dataset, draft_size
from mimbench.data import loading
from mimbench.data.folders import load_image
from mimbench.results.records import validate_record


@pytest.fixture
def jpeg_tree(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / "imgs" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                arr = torch.randint(0, 256, (300, 400, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(folder / f"{i}.JPEG", quality=90)
    return tmp_path / "imgs"


def test_loader_rule(monkeypatch):
    monkeypatch.setattr(loading, "cpus_per_process", lambda: 2)
    cpu = loading.loader_options(8, "cpu")
    assert cpu == {"num_workers": 2, "pin_memory": False, "persistent_workers": True, "prefetch_factor": 2}
    cuda = loading.loader_options(8, "cuda")
    assert cuda["pin_memory"] and cuda["prefetch_factor"] == loading.PREFETCH_CUDA and cuda["num_workers"] == 2
    assert loading.loader_options(0, "cuda") == {"num_workers": 0, "pin_memory": True, "persistent_workers": False}


def test_cpus_are_shared_by_the_local_processes(monkeypatch):
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loading.cpus_per_process() == 2


def test_draft_decodes_a_jpeg_downscaled_and_off_by_default(jpeg_tree):
    path = next((jpeg_tree / "train" / "a").iterdir())
    assert load_image(path).size == (400, 300)
    small = load_image(path, draft=64)
    assert small.size == (100, 75) and small.mode == "RGB"  # 1/4 scale: the smallest with both sides >= 64
    assert draft_size(224) == 256
    full = build_dataset(str(jpeg_tree), "train")
    drafted = build_dataset(str(jpeg_tree), "train", decode_draft=128)
    assert full[0][0].size == (400, 300) and drafted[0][0].size == (200, 150)


def test_decode_draft_is_a_config_leaf_that_defaults_off():
    from mimbench.config import load_config

    assert load_config("eval_configs/linear/mae_vit-b_in1k.py", kind="linear").decode_draft is False
    cfg = load_config("pretrain/configs/mae_micro_fmnist.py", ["data.decode_draft=True"], kind="pretrain")
    assert cfg.data.decode_draft is True


def test_protocol_transforms_come_from_the_project_builders(jpeg_tree):
    tfs = protocol_transforms(str(jpeg_tree), 32)
    assert set(tfs) == {"pretrain", "finetune", "linear", "eval"}
    assert "rand-m9-mstd0.5-inc1" in tfs["finetune"][1] or "RandAugment" in tfs["finetune"][1]
    assert tfs["linear"][1].startswith("randomresizedcrop32(scale=(0.08, 1.0)")
    assert tfs["eval"][1].startswith("resize36-bicubic/centercrop32")
    img = load_image(next((jpeg_tree / "train" / "a").iterdir()))
    for transform, _ in tfs.values():
        assert transform(img).shape == (3, 32, 32)


def test_bench_data_reports_decode_augment_and_workers(tmp_path, jpeg_tree):
    record = run_bench("data", data=str(jpeg_tree), steps=1, batch=2, warmup=1, workers=1, out=tmp_path,
                       step_img_per_s=1e6)
    validate_record(record)
    m, p = record["metrics"], record["protocol"]
    assert p["decode_draft"] == draft_size(224) and set(p["transforms"]) == {"pretrain", "finetune", "linear", "eval"}
    for name in p["transforms"]:
        per_worker = m[f"{name}_per_worker_img_per_s"]
        assert 0 < per_worker < min(m["decode_img_per_s"], m[f"{name}_augment_img_per_s"])
        assert m[f"{name}_workers_needed"] == -(-1e6 // per_worker)
    assert m["draft_decode_speedup"] == pytest.approx(m["draft_decode_img_per_s"] / m["decode_img_per_s"])
    text = format_bench(record)
    assert "downscaled to >= 256 px" in text and "workers for 1000000 img/s" in text


def test_cached_features_with_decode_draft_are_another_entry(tmp_path, jpeg_tree, tiny_encoder):
    from mimbench.evals.features import extract_features

    common = dict(cache_dir=tmp_path / "cache", img_size=32, batch_size=4)
    full, _, info = extract_features(tiny_encoder, str(jpeg_tree), "val", **common)
    drafted, _, dinfo = extract_features(tiny_encoder, str(jpeg_tree), "val", decode_draft=True, **common)
    assert dinfo["transform"] == info["transform"] + f"/jpeg-draft{draft_size(32)}"
    assert dinfo["key"] != info["key"] and not dinfo["cached"] and full.shape == drafted.shape
    assert not (full == drafted).all()  # decoded at 1/8 scale (50x38 >= 37 px): other pixels, other features


def test_an_evaluation_with_decode_draft_lists_it_as_a_deviation(tmp_path, jpeg_tree, tiny_encoder):
    """The published protocols decode in full: a run that drafts says so in its record (and so in the report)."""
    from mimbench.evals import run_eval

    common = dict(encoder=tiny_encoder, config="eval_configs/knn/dino_k20.py", data=str(jpeg_tree))
    drafted = run_eval("knn", out=tmp_path / "on", overrides=["knn.k=2", "decode_draft=True"], **common)
    full = run_eval("knn", out=tmp_path / "off", overrides=["knn.k=2"], **common)
    assert any("decode_draft=True" in d for d in drafted["protocol"]["deviations"])
    assert not any("draft" in d for d in full["protocol"]["deviations"])
