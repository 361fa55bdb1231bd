"""Layer-wise probes: which blocks and tokens the features are read from (--layers / --pool)."""
import numpy as np
import pytest
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

import mimbench.encoders
from mimbench.config import load_config
from mimbench.encoders import load_encoder
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.features import Readout, check_readout, extract_features, read_features, readout, resolve_layers
from mimbench.evals.linear import build_head, build_optimizer, probe_loss
from mimbench.schema import LAYERS_SYNTAX

DATA = "builtin:fashion-mnist"


def _tiny_vit(cls=VisionTransformer, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cls(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0, **kw)
    for p in model.parameters():  # random non-trivial norms and embeddings (timm initialises LayerNorms to 1/0)
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _spec(model, combine, blocks, pool) -> Readout:
    return Readout("test", combine, tuple(blocks), pool, len(model.blocks))


def _timm_blocks(model, x, blocks):
    """timm's own reading of the blocks, through the final norm: [(patch tokens, prefix tokens)]."""
    return model.forward_intermediates(x, indices=list(blocks), norm=True, output_fmt="NLC",
                                       return_prefix_tokens=True, intermediates_only=True)


def test_last_block_class_token_is_todays_feature(tiny_encoder, tmp_path):
    common = dict(limit=24, img_size=32, amp="none")
    today, y0, info0 = extract_features(tiny_encoder, DATA, "val", cache_dir=tmp_path / "a", **common)
    explicit, y1, info1 = extract_features(tiny_encoder, DATA, "val", layers=-1, pool="cls",
                                           cache_dir=tmp_path / "b", **common)
    assert not info1["cached"] and np.array_equal(np.asarray(today), np.asarray(explicit)) and np.array_equal(y0, y1)
    assert info1["readout"] == {"layers": "-1", "combine": "single", "blocks": [1], "pool": "cls",
                                "norm": info0["readout"]["norm"]}
    # the default's cache key is unchanged (caches written before the readout existed stay valid)
    assert info0["key"] == info1["key"]
    model = load_encoder(tiny_encoder)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        today_x = model.forward_features(x)[:, 0]
        assert torch.equal(read_features(model, x, readout(tiny_encoder, "last", "cls")), today_x)


@pytest.mark.parametrize("family, reg_tokens", [("vit", 0), ("vit", 4), ("beit", 0)])
def test_a_block_equals_timm_forward_intermediates_through_the_final_norm(family, reg_tokens):
    if family == "beit":  # relative position bias in every block: the hooks still see each block's output
        model = _tiny_vit(Beit, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    else:
        model = _tiny_vit(reg_tokens=reg_tokens)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for block in (0, 2, 3):
            (patches, prefix), = _timm_blocks(model, x, [block])
            assert prefix.shape[1] == 1 + reg_tokens and patches.shape[1] == 16
            cls = read_features(model, x, _spec(model, "single", [block], "cls"))
            avg = read_features(model, x, _spec(model, "single", [block], "avg"))
            both = read_features(model, x, _spec(model, "single", [block], "cls+avg"))
            torch.testing.assert_close(cls, prefix[:, 0], rtol=0, atol=1e-6)
            torch.testing.assert_close(avg, patches.mean(dim=1), rtol=0, atol=1e-6)  # registers left out
            torch.testing.assert_close(both, torch.cat([cls, avg], dim=-1), rtol=0, atol=0)
        # the mean of blocks 0 and 2 (AIM), and every block at once (block 0 first)
        timm = _timm_blocks(model, x, [0, 1, 2, 3])
        mean = read_features(model, x, _spec(model, "mean", [0, 2], "cls"))
        torch.testing.assert_close(mean, (timm[0][1][:, 0] + timm[2][1][:, 0]) / 2, rtol=0, atol=1e-6)
        every = read_features(model, x, _spec(model, "all", [0, 1, 2, 3], "avg"))
        torch.testing.assert_close(every, torch.cat([p.mean(dim=1) for p, _ in timm], dim=-1), rtol=0, atol=1e-6)


def test_concat_of_the_last_four_blocks_is_four_class_tokens_side_by_side(dist_encoder, tmp_path):
    common = dict(cache_dir=tmp_path, limit=16, img_size=32, amp="none")
    cat, _, info = extract_features(dist_encoder, DATA, "val", layers="concat:4", **common)
    assert cat.shape == (16, 4 * 32) and info["readout"]["blocks"] == [0, 1, 2, 3]
    block1, _, _ = extract_features(dist_encoder, DATA, "val", layers=1, **common)
    np.testing.assert_allclose(cat[:, 32:64], block1, rtol=0, atol=1e-6)
    both, _, _ = extract_features(dist_encoder, DATA, "val", layers="concat:2", pool="cls+avg", **common)
    assert both.shape == (16, 2 * 2 * 32)
    last, _, _ = extract_features(dist_encoder, DATA, "val", **common)
    np.testing.assert_allclose(both[:, 64:96], last, rtol=0, atol=1e-6)  # block 3's class token


def test_heads_per_block_trained_together_equal_heads_trained_alone():
    torch.manual_seed(0)
    together = build_head(8, 3, blocks=2)
    alone = [build_head(8, 3) for _ in range(2)]
    for b, head in enumerate(alone):
        head[1].load_state_dict(together[1].heads[b].state_dict())
    optim = {"name": "lars", "momentum": 0.9, "trust_coeff": 0.001, "weight_decay": 0.0}
    x, y = torch.randn(16, 16), torch.randint(0, 3, (16,))
    opt = build_optimizer(together, optim, lr=1.0)
    probe_loss(together, None, x, y).backward()
    opt.step()
    for b, head in enumerate(alone):
        opt_b = build_optimizer(head, optim, lr=1.0)
        probe_loss(head, None, x[:, 8 * b:8 * (b + 1)], y).backward()
        opt_b.step()
        torch.testing.assert_close(head[1].weight, together[1].heads[b].weight, rtol=0, atol=1e-7)
        torch.testing.assert_close(head[1].bias, together[1].heads[b].bias, rtol=0, atol=1e-7)


def test_all_blocks_one_forward_per_batch_per_block_metrics_and_plot(dist_encoder, tmp_path, monkeypatch):
    passes, real = [], mimbench.encoders.load_encoder

    def counting(*args, **kwargs):
        model = real(*args, **kwargs)
        model.patch_embed.register_forward_hook(lambda *a: passes.append(1))
        return model

    monkeypatch.setattr(mimbench.encoders, "load_encoder", counting)
    record = run_eval("linear", encoder=dist_encoder, config="eval_configs/demo/linear_fmnist.py", data=DATA,
                      out=tmp_path / "run", layers="all", select_on="val",  # today's selection, on val
                      overrides=["data.limit_train=64", "data.limit_val=32", "feature_batch_size=16",
                                 "optim.batch_size=32", "schedule.epochs=2", "schedule.warmup_epochs=1",
                                 "runtime.progress=False", f"cache_dir={str(tmp_path / 'cache')!r}"])
    assert len(passes) == (64 + 32) // 16  # one forward per batch for all four blocks
    metrics = record["metrics"]
    assert set(metrics["per_block"]) == {"0", "1", "2", "3"}
    assert metrics["top1"] == metrics["per_block"]["3"]["top1"]
    best = metrics["best_block"]
    assert metrics["best_top1"] == max(m["top1"] for m in metrics["per_block"].values())
    assert metrics["per_block"][str(best)]["top1"] == metrics["best_top1"]
    assert record["protocol"]["readout"]["combine"] == "all" and "val" in record["protocol"]["block_selection"]
    assert "layers=\"all\"" in record["protocol"]["overrides"]
    png = (tmp_path / "run" / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


SWEEP = ["data.limit_train=64", "data.limit_val=32", "feature_batch_size=16", "optim.batch_size=16",
         "schedule.epochs=2", "schedule.warmup_epochs=1", "runtime.progress=False"]


def test_the_sweep_selects_its_best_block_on_a_training_holdout_it_never_trains_on(dist_encoder, tmp_path, monkeypatch):
    import mimbench.evals.linear as lin

    trained, real = [], lin.runner.TensorBatches
    monkeypatch.setattr(lin.runner, "TensorBatches",
                        lambda run, x, y, *a: trained.append(x.cpu()) or real(run, x, y, *a))
    cache = f"cache_dir={str(tmp_path / 'cache')!r}"
    record = run_eval("linear", encoder=dist_encoder, config="eval_configs/demo/linear_fmnist.py", data=DATA,
                      out=tmp_path / "run", layers="all", overrides=[*SWEEP, cache])
    selection = record["protocol"]["selection"]
    assert selection == {"on": "train-holdout", "selects": "best_block", "holdout": 0.1, "holdout_images": 6}
    assert record["dataset"]["sizes"] == {"train": 58, "val": 32, "holdout": 6}
    keep, held = lin.holdout_split(64, 0.1, record["seed"])
    assert len(held) == 6 and not set(keep) & set(held)
    every, _, _ = extract_features(dist_encoder, DATA, "train", cache_dir=tmp_path / "cache", limit=64, layers="all")
    (rows,) = trained
    assert rows.shape[0] == 58 and torch.equal(rows, torch.from_numpy(np.array(every[keep])))
    metrics = record["metrics"]
    assert metrics["best_top1"] == metrics["per_block"][str(metrics["best_block"])]["top1"]
    assert 0 <= metrics["select_top1"] <= 100 and "held-out" in record["protocol"]["block_selection"]

    val = run_eval("linear", encoder=dist_encoder, config="eval_configs/demo/linear_fmnist.py", data=DATA,
                   out=tmp_path / "val", layers="all", select_on="val", overrides=[*SWEEP, cache])
    assert val["protocol"]["selection"] == {"on": "val", "selects": "best_block"}
    assert val["dataset"]["sizes"] == {"train": 64, "val": 32} and "select_top1" not in val["metrics"]
    assert val["metrics"]["best_top1"] == max(m["top1"] for m in val["metrics"]["per_block"].values())
    from mimbench.results.report import write_report

    report = write_report([tmp_path / "run", tmp_path / "val"])
    assert "selection: best_block selected on a held-out part of the training set" in report
    assert "selection: best_block selected on the val split (as published)" in report


def test_a_single_block_probe_holds_nothing_out(tiny_encoder, tmp_path):
    record = run_eval("linear", encoder=tiny_encoder, config="eval_configs/demo/linear_fmnist.py", data=DATA,
                      out=tmp_path, overrides=[*SWEEP, f"cache_dir={str(tmp_path / 'cache')!r}"])
    assert "selection" not in record["protocol"] and record["dataset"]["sizes"] == {"train": 64, "val": 32}


def test_protocol_mode_reads_the_chosen_blocks_from_augmented_images(dist_encoder, tmp_path, monkeypatch):
    import mimbench.evals.linear as lin

    seen, real = [], lin.read_features
    monkeypatch.setattr(lin, "read_features", lambda model, x, spec: seen.append(spec) or real(model, x, spec))
    record = run_eval("linear", encoder=dist_encoder, config="eval_configs/linear/mae_vit-b_in1k.py", data=DATA,
                      out=tmp_path, layers="concat:2", pool="avg",
                      overrides=["img_size=32", "optim.batch_size=8", "optim.eff_batch_size=8", "schedule.epochs=1",
                                 "schedule.warmup_epochs=0", "data.limit_train=16", "data.limit_val=8",
                                 "data.num_workers=0", "runtime.progress=False", "runtime.ckpt_every=0"])
    assert len(seen) == 16 // 8 + 1 and {(s.blocks, s.pool) for s in seen} == {((2, 3), "avg")}
    assert record["protocol"]["readout"]["blocks"] == [2, 3] and record["protocol"]["deviations"] == []
    assert 0 <= record["metrics"]["top1"] <= 100


@pytest.mark.parametrize("value, why", [("bogus", "not a layer selection"), ("concat:0", "not a layer selection"),
                                        ("mean:1,x", "not a layer selection"), (12, "names block 12"),
                                        ("-13", "names block -13"), ("concat:13", "last 13 blocks"),
                                        ("mean:0,12", "names block 12")])
def test_bad_layers_are_refused_with_the_syntax(value, why):
    with pytest.raises(MimbenchError) as err:
        resolve_layers(value, 12)
    assert why in err.value.problem and LAYERS_SYNTAX in err.value.fix


def test_bad_values_are_refused_before_any_work(tiny_encoder, tmp_path):
    cfg = "eval_configs/demo/linear_fmnist.py"
    with pytest.raises(MimbenchError) as err:
        load_config(cfg, ["layers=last3"], kind="linear")
    assert "`layers`" in err.value.problem and LAYERS_SYNTAX in err.value.problem
    with pytest.raises(MimbenchError) as err:
        load_config(cfg, ["pool=max"], kind="linear")
    assert "`pool`" in err.value.problem and "'cls+avg'" in err.value.problem
    with pytest.raises(MimbenchError) as err:  # the tiny encoder has 2 blocks
        run_eval("linear", encoder=tiny_encoder, config=cfg, data=DATA, out=tmp_path / "run", layers="5",
                 overrides=[f"cache_dir={str(tmp_path / 'cache')!r}"])
    assert "2 blocks" in err.value.problem and not (tmp_path / "cache").exists()
    with pytest.raises(MimbenchError) as err:
        check_readout(_tiny_vit(class_token=False, global_pool="avg"), _spec(_tiny_vit(), "single", [3], "cls"))
    assert "class token" in err.value.problem and "--pool avg" in err.value.fix


def test_protocol_mode_sweep_scores_its_holdout_unaugmented_and_trains_on_the_rest(dist_encoder, tmp_path):
    record = run_eval("linear", encoder=dist_encoder, config="eval_configs/linear/mae_vit-b_in1k.py", data=DATA,
                      out=tmp_path, layers="all",
                      overrides=["img_size=32", "optim.batch_size=8", "optim.eff_batch_size=8", "schedule.epochs=1",
                                 "schedule.warmup_epochs=0", "data.limit_train=20", "data.limit_val=8",
                                 "runtime.progress=False", "runtime.ckpt_every=0"])
    assert record["dataset"]["sizes"] == {"train": 18, "val": 8, "holdout": 2}
    assert record["protocol"]["selection"]["on"] == "train-holdout"
    assert 0 <= record["metrics"]["select_top1"] <= 100
