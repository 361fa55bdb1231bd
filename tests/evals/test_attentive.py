"""Attentive probing: the three head presets as their sources build them, the shipped configs' values, the demo
config end to end, and the errors a wrong head section gets."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimbench.config import load_config
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.attentive import (AttentiveHead, attend, build_head, cosine_weight_decay, encoder_tokens,
                                      parameter_count)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "eval_configs"

# The published values each shipped config carries (shared protocol notes, "Attentive probing"), with their source.
PUBLISHED = {
    # Atten4Vis/CAE tools/run_attentive.py + scripts/cae_base_800e.sh
    "cae_vit-b_in1k": {"head.preset": "cae", "head.num_queries": 1, "head.tokens": "all", "head.final_norm": True,
                       "optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.4, "optim.eff_batch_size": 8192,
                       "optim.weight_decay": 0.0, "schedule.epochs": 90, "schedule.warmup_epochs": 10,
                       "augment.mode": "rrc_flip", "img_size": 224, "clip_grad": None},
    # billpsomas/efficient-probing poolings/ep.py + the MAE linprobe recipe it runs in
    "ep_vit-b_in1k": {"head.preset": "ep", "head.num_queries": 32, "head.num_heads": 1, "head.tokens": "patch",
                      "optim.name": "lars", "optim.blr": 0.1, "optim.momentum": 0.9, "optim.trust_coeff": 0.001,
                      "optim.weight_decay": 0.0, "optim.eff_batch_size": 4096, "schedule.epochs": 90,
                      "schedule.warmup_epochs": 10, "augment.mode": "rrc_flip", "img_size": 224},
    # facebookresearch/jepa src/models/attentive_pooler.py + configs/evals/vitl16_in1k.yaml
    "vjepa_vit-l_in1k": {"head.preset": "vjepa", "head.num_queries": 1, "head.mlp_ratio": 4.0, "head.tokens": "patch",
                         "head.final_norm": True, "optim.name": "adamw", "optim.lr": 1e-3,
                         "optim.weight_decay": 0.001, "optim.final_weight_decay": 1e-6, "optim.eff_batch_size": 1024,
                         "schedule.epochs": 20, "schedule.warmup_epochs": 0, "schedule.min_lr": 0.0,
                         "clip_grad": 1.0, "augment.mode": "timm", "augment.auto_augment": "original",
                         "augment.re_prob": 0.25, "augment.re_mode": "pixel", "augment.re_count": 1, "img_size": 224},
}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_shipped_config_carries_its_sources_values(name):
    cfg = load_config(CONFIGS / "attentive" / f"{name}.py", kind="attentive")
    for key, value in PUBLISHED[name].items():
        assert _get(cfg, key) == value, (name, key)
    assert cfg.mode == "protocol" and list(cfg.deviations) == []
    if cfg.optim.name == "sgd":  # CAE: an absolute rate, not a base rate
        assert cfg.optim.blr is None


D, C, HEADS = 32, 10, 4


def _expected_params(preset, q=1):
    """Parameter counts written out from each source's layers (the batch norm has no affine parameters)."""
    linear = D * C + C
    if preset == "cae":  # query, 3 LayerNorms, q/k/v weights without bias, q and v biases, output projection
        return D + 3 * 2 * D + 3 * D * D + 2 * D + (D * D + D) + linear
    if preset == "ep":  # Q queries, one value projection without bias
        return q * D + D * D + linear
    # vjepa: query, 2 LayerNorms, q (bias), joint kv (bias), MLP D -> 4D -> D
    return D + 2 * 2 * D + (D * D + D) + (2 * D * D + 2 * D) + (D * 4 * D + 4 * D + 4 * D * D + D) + linear


@pytest.mark.parametrize("preset,q", [("cae", 1), ("ep", 8), ("ep", 32), ("vjepa", 1)])
def test_heads_map_tokens_to_scores_with_their_sources_parameter_count(preset, q):
    torch.manual_seed(0)
    head = build_head(preset, D, C, heads=HEADS, num_queries=q)
    assert isinstance(head, AttentiveHead) and parameter_count(head) == _expected_params(preset, q)
    assert (head.norm is None) == (preset == "vjepa")  # CAE and EP: BatchNorm1d(affine=False) before the linear
    tokens = torch.randn(6, 17, D)
    pooled, weights = head.pooling(tokens, return_attention=True)
    assert pooled.shape == (6, D)
    assert weights.shape == (6, 1 if preset == "ep" else HEADS, q, 17)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    assert head(tokens).shape == (6, C)
    head.eval()  # any number of tokens: the head has no position embedding
    assert head(torch.randn(2, 5, D)).shape == (2, C)


def test_cae_zero_query_attends_uniformly_at_initialisation():
    head = build_head("cae", D, C, heads=HEADS)
    tokens = torch.randn(3, 9, D) * 5
    _, weights = head.pooling(tokens, return_attention=True)
    assert torch.allclose(weights, torch.full_like(weights, 1 / 9), atol=1e-6)
    with torch.no_grad():
        head.pooling.query.normal_()
    _, trained = head.pooling(tokens, return_attention=True)
    assert not torch.allclose(trained, weights, atol=1e-3)  # the uniform weights come from the zero query


def test_attention_equals_torch_sdpa():
    q, k, v = torch.randn(2, 3, D), torch.randn(2, 7, D), torch.randn(2, 7, D)
    ours, _ = attend(q, k, v, HEADS)
    split = lambda t: t.reshape(2, t.shape[1], HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 3, D)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_ep_query_reads_its_own_value_chunk_over_raw_tokens():
    """EP by its definition: softmax(q_i . x_n / sqrt(D)) over the raw tokens, query i summing chunk i of V(x)."""
    torch.manual_seed(1)
    q = 4
    pooling = build_head("ep", D, C, heads=1, num_queries=q).pooling
    x = torch.randn(2, 6, D)
    value, width = pooling.v(x), D // q
    expected = torch.empty(2, D)
    for i in range(q):
        w = (x @ pooling.query[0, i] / math.sqrt(D)).softmax(-1)  # B×N
        expected[:, i * width:(i + 1) * width] = torch.einsum("bn,bnc->bc", w, value[..., i * width:(i + 1) * width])
    assert torch.allclose(pooling(x), expected, atol=1e-5)


def test_vjepa_block_is_residual_around_attention_and_mlp():
    torch.manual_seed(2)
    pooling = build_head("vjepa", D, C, heads=HEADS).pooling
    x = torch.randn(3, 5, D)
    q = pooling.query.expand(3, -1, -1)
    k, v = pooling.kv(pooling.norm1(x)).chunk(2, -1)
    split = lambda t: t.reshape(3, t.shape[1], HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
    q = q + F.scaled_dot_product_attention(split(pooling.q(q)), split(k), split(v)).transpose(1, 2).reshape(3, 1, D)
    expected = (q + pooling.mlp(pooling.norm2(q)))[:, 0]
    assert torch.allclose(pooling(x), expected, atol=1e-5)


def test_unknown_preset_and_mismatched_head_are_refused():
    with pytest.raises(MimbenchError, match="Unknown attentive head preset 'cea'"):
        build_head("cea", D, C, heads=HEADS)
    with pytest.raises(MimbenchError, match="one query"):
        build_head("cae", D, C, heads=HEADS, num_queries=4)
    with pytest.raises(MimbenchError, match="does not divide"):
        build_head("ep", D, C, heads=1, num_queries=5)
    with pytest.raises(MimbenchError, match="do not divide the token width"):
        build_head("vjepa", D, C, heads=5)


def test_tokens_before_the_final_norm_are_what_the_norm_receives(tiny_encoder):
    from mimbench.encoders import load_encoder

    model = load_encoder(tiny_encoder).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        after = encoder_tokens(model, x, tokens="all", final_norm=True)
        before = encoder_tokens(model, x, tokens="all", final_norm=False)
        patches = encoder_tokens(model, x, tokens="patch", final_norm=True)
    assert after.shape == (2, 1 + 16, 32) and patches.shape == (2, 16, 32)
    assert torch.allclose(model.norm(before), after, atol=1e-5) and not torch.allclose(before, after)
    assert torch.equal(patches, after[:, 1:])  # the class token is dropped
    assert not model.norm._forward_hooks  # the hook is removed again


def test_patch_tokens_leave_out_the_class_token_and_registers():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        every = encoder_tokens(model, x, tokens="all", final_norm=True)
        patches = encoder_tokens(model, x, tokens="patch", final_norm=True)
    assert every.shape[1] == 1 + 4 + 4 and patches.shape[1] == 4
    assert torch.equal(patches, every[:, 5:])


def test_weight_decay_follows_vjepas_cosine_to_its_final_value():
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 1e-3}])
    cosine_weight_decay(opt, 1e-3, 1e-6, 4, 10)  # after step 5 of 10: half way
    assert opt.param_groups[0]["weight_decay"] == pytest.approx((1e-3 + 1e-6) / 2)
    cosine_weight_decay(opt, 1e-3, 1e-6, 9, 10)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-6)
    cosine_weight_decay(opt, 1e-3, None, 0, 10)  # no final value: constant, untouched
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-6)


def test_demo_config_runs_on_builtin_data_and_records_the_head(tiny_encoder, tmp_path):
    record = run_eval("attentive", encoder=tiny_encoder, config=CONFIGS / "demo" / "attentive_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=256", "data.limit_val=64", "schedule.epochs=2"])
    protocol = record["protocol"]
    assert record["status"] == "ok" and record["dataset"]["sizes"] == {"train": 256, "val": 64}
    assert protocol["head_preset"] == "ep" and protocol["num_queries"] == 4
    assert protocol["head_params"] == 4 * 32 + 32 * 32 + 32 * 10 + 10
    assert protocol["tokens"].startswith("16 patch tokens of the last block before the final norm")
    assert protocol["deviations"][0].startswith("attentive probe on tokens of un-augmented images")
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    saved = json.loads(next(tmp_path.glob("attentive-*.json")).read_text())
    assert saved["protocol"]["head_params"] == protocol["head_params"]


def test_a_head_section_its_preset_cannot_build_is_refused_before_any_work(tiny_encoder, tmp_path):
    with pytest.raises(MimbenchError, match="one query"):
        run_eval("attentive", encoder=tiny_encoder, config=CONFIGS / "demo" / "attentive_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "run", overrides=["head.preset='cae'"])
    assert not list((tmp_path / "run").glob("checkpoint-*.pt")) and not list((tmp_path / "run").glob("*.json"))
    with pytest.raises(MimbenchError, match="one head"):
        run_eval("attentive", encoder=tiny_encoder, config=CONFIGS / "demo" / "attentive_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "run1", overrides=["head.num_heads=2"])
    with pytest.raises(MimbenchError, match="cached"):
        run_eval("attentive", encoder=tiny_encoder, config=CONFIGS / "demo" / "attentive_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "run2", overrides=["augment.mode='timm'"])


@pytest.mark.parametrize("block", [0, 2, -1])
@pytest.mark.parametrize("family", ["vit", "beit"])
def test_a_blocks_tokens_equal_timm_forward_intermediates(family, block):
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    model = VisionTransformer(reg_tokens=2, **kw) if family == "vit" else Beit(**kw)
    for p in model.parameters():  # non-trivial norms (timm initialises LayerNorms to 1/0)
        p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for final_norm in (True, False):
            ((patch, prefix),) = model.forward_intermediates(x, indices=[block % 3], norm=final_norm, output_fmt="NLC",
                                                             return_prefix_tokens=True, intermediates_only=True)
            every = encoder_tokens(model, x, tokens="all", final_norm=final_norm, block=block)
            patches = encoder_tokens(model, x, tokens="patch", final_norm=final_norm, block=block)
            torch.testing.assert_close(every, torch.cat([prefix, patch], dim=1), rtol=0, atol=1e-6)
            torch.testing.assert_close(patches, patch, rtol=0, atol=1e-6)
    assert not any(b._forward_hooks for b in model.blocks) and not model.norm._forward_hooks


def test_layers_picks_the_attended_block_and_the_record_names_it(tiny_encoder, tmp_path):
    common = dict(encoder=tiny_encoder, config=CONFIGS / "demo" / "attentive_fmnist.py", data="builtin:fashion-mnist",
                  overrides=["data.limit_train=64", "data.limit_val=32", "optim.batch_size=32", "schedule.epochs=1",
                             "schedule.warmup_epochs=0", "runtime.progress=False"])
    record = run_eval("attentive", out=tmp_path / "b0", layers="0", **common)
    assert record["protocol"]["block"] == 0 and record["protocol"]["layers"] == "0"
    assert record["protocol"]["tokens"].startswith("16 patch tokens of block 0 before the final norm")
    assert "layers=\"0\"" in record["protocol"]["overrides"]
    last = run_eval("attentive", out=tmp_path / "last", **common)
    assert last["protocol"]["block"] == 1 and last["protocol"]["layers"] == "last"
    for bad, why in (("all", "names 2 blocks"), ("concat:2", "names 2 blocks"), ("5", "names block 5")):
        with pytest.raises(MimbenchError, match=why):
            run_eval("attentive", out=tmp_path / f"bad{bad}", layers=bad, **common)
        assert not list((tmp_path / f"bad{bad}").glob("*.json"))


# ---------------------------------------------------------------------------- the reported epoch
SELECTING = dict(config=CONFIGS / "demo" / "attentive_fmnist.py", data="builtin:fashion-mnist")
SMALL_RUN = ["data.limit_train=80", "data.limit_val=40", "optim.batch_size=16", "schedule.epochs=3",
             "schedule.warmup_epochs=0", "runtime.progress=False"]


@pytest.mark.parametrize("name, best_epoch", [("ep_vit-b_in1k", True), ("cae_vit-b_in1k", False),
                                              ("vjepa_vit-l_in1k", False)])
def test_only_the_preset_whose_source_selects_an_epoch_selects_one(name, best_epoch):
    """Efficient Probing reports its best epoch; CAE's and V-JEPA's configs report the last one."""
    cfg = load_config(CONFIGS / "attentive" / f"{name}.py", kind="attentive")
    assert cfg.selection.best_epoch is best_epoch
    assert (cfg.selection.on, cfg.selection.holdout) == ("train-holdout", 0.1)  # the default, not val
    demo = load_config(CONFIGS / "demo" / "attentive_fmnist.py", kind="attentive")  # EP's head, the last epoch
    assert demo.selection.best_epoch is False and any(d.startswith("epoch: the last one") for d in demo.deviations)


def test_the_best_epoch_is_selected_on_a_training_holdout_by_default(tiny_encoder, tmp_path, monkeypatch):
    from mimbench.evals import attentive
    from mimbench.evals.linear import holdout_split

    computed, trained = [], []
    real_tokens, real_batches = attentive.compute_tokens, attentive.runner.TensorBatches
    monkeypatch.setattr(attentive, "compute_tokens", lambda *a, **k: computed.append(real_tokens(*a, **k))
                        or computed[-1])
    monkeypatch.setattr(attentive.runner, "TensorBatches", lambda run, x, y, *a: trained.append(x.cpu())
                        or real_batches(run, x, y, *a))
    record = run_eval("attentive", encoder=tiny_encoder, out=tmp_path, **SELECTING,
                      overrides=SMALL_RUN + ["selection.best_epoch=True"])
    keep, held = holdout_split(80, 0.1, record["seed"])
    (every, _), _ = computed  # the training split's tokens, then the val split's
    assert len(held) == 8 and torch.equal(trained[0], every[torch.from_numpy(keep)].cpu())  # the 8: never trained on
    sel, metrics = record["protocol"]["selection"], record["metrics"]
    assert record["dataset"]["sizes"] == {"train": 72, "val": 40, "holdout": 8}  # 10 % of 80 never trained on
    assert (sel["on"], sel["selects"], sel["of"], sel["holdout_images"]) == ("train-holdout", "best_epoch", 3, 8)
    scores = sel["per_epoch"]
    assert sorted(scores) == ["1", "2", "3"]
    best = max(range(1, 4), key=lambda e: (scores[str(e)], e))  # the later epoch on a tie
    assert sel["epoch"] == metrics["best_epoch"] == best and sel["select_top1"] == scores[str(best)]
    assert sel["last_epoch_top1"] == metrics["last_epoch_top1"]
    assert all(v * 8 / 100 == pytest.approx(round(v * 8 / 100)) for v in scores.values())  # scored on the 8
    assert record["protocol"]["reported_epoch"] == "selected"
    assert "selection.best_epoch=True" in record["protocol"]["overrides"]
    from mimbench.results.report import write_report

    report = write_report([tmp_path])
    assert (f"selection: best_epoch (epoch {best} of 3; last epoch top-1 {metrics['last_epoch_top1']:.2f}) selected "
            "on a held-out part of the training set") in report


def test_select_on_val_reports_the_val_best_epoch_with_the_last_beside_it(tiny_encoder, tmp_path):
    record = run_eval("attentive", encoder=tiny_encoder, out=tmp_path, select_on="val", **SELECTING,
                      overrides=SMALL_RUN + ["selection.best_epoch=True"])
    sel, metrics = record["protocol"]["selection"], record["metrics"]
    assert record["dataset"]["sizes"] == {"train": 80, "val": 40}  # nothing held out
    assert sel["on"] == "val" and "holdout" not in sel
    # on val, each epoch's selection score is its validation top-1: the reported top-1 is their maximum (the kept
    # head of that epoch, scored again), the last epoch's beside it
    assert metrics["top1"] == pytest.approx(max(sel["per_epoch"].values()))
    assert metrics["top1"] == pytest.approx(sel["per_epoch"][str(sel["epoch"])])
    assert metrics["last_epoch_top1"] == pytest.approx(sel["per_epoch"]["3"])
    assert 'selection.on="val"' in record["protocol"]["overrides"]


def test_select_on_is_refused_for_a_config_that_reports_the_last_epoch(tiny_encoder, tmp_path):
    with pytest.raises(MimbenchError, match="reports the last epoch"):
        run_eval("attentive", encoder=tiny_encoder, out=tmp_path / "run", select_on="val", **SELECTING,
                 overrides=SMALL_RUN)
    assert not list((tmp_path / "run").glob("*.json")) and not list((tmp_path / "run").glob("checkpoint-*.pt"))


def test_the_cli_passes_select_on_to_the_attentive_probe(tiny_encoder, tmp_path):
    from typer.testing import CliRunner

    from mimbench.cli import app

    sets = sum((["--set", s] for s in SMALL_RUN), [])
    base = ["eval", "attentive", "--encoder", str(tiny_encoder), "--out", str(tmp_path / "run"), *sets]
    refused = CliRunner().invoke(app, [*base, "--select-on", "val"], terminal_width=200)
    assert refused.exit_code != 0 and "reports the last epoch" in refused.output
    wrong = CliRunner().invoke(app, [*base, "--select-on", "test"], terminal_width=200)
    assert wrong.exit_code != 0 and "train-holdout" in wrong.output
    ran = CliRunner().invoke(app, [*base, "--select-on", "val", "--set", "selection.best_epoch=True"],
                             terminal_width=200)
    assert ran.exit_code == 0, ran.output
    (saved,) = (tmp_path / "run").glob("attentive-*.json")
    assert json.loads(saved.read_text())["protocol"]["selection"]["on"] == "val"


def test_a_resumed_selection_drops_epochs_after_the_checkpoint_and_keeps_the_best_before(tmp_path):
    from types import SimpleNamespace

    from mimbench.engine import save_checkpoint
    from mimbench.evals.attentive import SELECTION_FILE, EpochSelection

    head = torch.nn.Linear(2, 2)
    state = lambda v: {"weight": torch.full((2, 2), float(v)), "bias": torch.zeros(2)}  # noqa: E731
    run = SimpleNamespace(out=tmp_path, is_main=True)
    save_checkpoint(tmp_path / "checkpoint-latest.pt", {"epoch": 2})  # epoch 3 was scored, not checkpointed
    save_checkpoint(tmp_path / SELECTION_FILE, {"scores": {1: 50.0, 2: 60.0, 3: 70.0},
                                                "best": {"epoch": 3, "state": state(3)},
                                                "before_best": {"epoch": 2, "state": state(2)}})
    sel = EpochSelection(run, head, None, None, 1, on="val", iters_per_epoch=4, resume=True)
    assert sel.scores == {1: 50.0, 2: 60.0} and sel.best["epoch"] == 2
    assert torch.equal(sel.best["state"]["weight"], state(2)["weight"])
    save_checkpoint(tmp_path / SELECTION_FILE, {"scores": {1: 50.0}, "best": {"epoch": 1, "state": state(1)},
                                                "before_best": None})
    with pytest.raises(MimbenchError, match=r"no selection score of epoch\(s\) 2"):
        EpochSelection(run, head, None, None, 1, on="val", iters_per_epoch=4, resume=True)


def test_a_run_interrupted_after_scoring_an_epoch_resumes_to_the_same_selection(tiny_encoder, tmp_path, monkeypatch):
    from mimbench.evals import attentive

    common = dict(encoder=tiny_encoder, overrides=SMALL_RUN + ["selection.best_epoch=True"], **SELECTING)
    whole = run_eval("attentive", out=tmp_path / "whole", **common)
    real = attentive.EpochSelection.step_end

    def stop_after_epoch_2(self, it):  # epoch 2 scored and its selection saved, its training checkpoint not written
        real(self, it)
        if 2 in self.scores:
            raise KeyboardInterrupt

    monkeypatch.setattr(attentive.EpochSelection, "step_end", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_eval("attentive", out=tmp_path / "part", **common)
    assert not list((tmp_path / "part").glob("attentive-*.json"))
    monkeypatch.setattr(attentive.EpochSelection, "step_end", real)
    resumed = run_eval("attentive", out=tmp_path / "part", resume=True, **common)
    assert resumed["protocol"]["selection"] == whole["protocol"]["selection"]
    assert resumed["metrics"]["top1"] == whole["metrics"]["top1"]


# ---------------------------------------------------------------------------- encoders the head cannot read
def test_a_patch_token_head_after_the_final_norm_refuses_an_encoder_without_normed_patch_tokens(tmp_path):
    """EVA-02 as timm ships it: the final norm acts on the pooled feature (fc_norm), so there are no normed patch
    tokens for the V-JEPA head to attend to; refused before any work. Read before the final norm (EP), it is fine."""
    import timm

    from mimbench.encoders import convert_checkpoint, read_metadata
    from mimbench.evals.attentive import check_encoder

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, patch_size=14, embed_dim=32, depth=2,
                              num_heads=2, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    enc = convert_checkpoint(tmp_path / "w.pth", tmp_path / "eva02.safetensors", num_heads=2)
    assert read_metadata(enc)["final_norm"] == "pooled"
    with pytest.raises(MimbenchError, match="no normed patch tokens") as err:
        run_eval("attentive", encoder=enc, config=CONFIGS / "demo" / "attentive_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "run",
                 overrides=["head.final_norm=True", "data.limit_train=32", "data.limit_val=16"])
    assert "head.final_norm=False" in err.value.fix
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    section = lambda **kw: type("Cfg", (), {"head": type("Head", (), {"preset": "ep", **kw})})  # noqa: E731
    check_encoder(section(tokens="patch", final_norm=False), read_metadata(enc), "eva02")  # before the norm: fine
    check_encoder(section(tokens="all", final_norm=True), read_metadata(enc), "eva02")  # all tokens: as they are
