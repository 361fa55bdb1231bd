"""Published leaderboard: file integrity, validation, ranking with own runs, compare and its refusals."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from mimbench.errors import MimbenchError
from mimbench.results.leaderboard import (ATTENTIVE_PROTOCOLS, COLUMNS, KEY, LOWSHOT_PROTOCOLS, STANDARD_PROTOCOLS,
                                          compare_runs,
                                          leaderboard_problems,
                                          load_leaderboard, normalize_arch, packaged_csv, show_leaderboard,
                                          validate_leaderboard)
from mimbench.results.records import new_record, write_record

REPO_ROOT = Path(__file__).resolve().parents[2]


def record(tmp_path, task="finetune", value=83.55, arch="vit-b/16", deviations=(), dataset="imagenet", seed=0,
           technique="mae", epochs=800.0, overrides=()):
    t = time.time()
    metric = {"mIoU": value} if task == "segment" else {"top1": value}
    rec = new_record(task, protocol={"name": f"{task}/vit-b16_in1k", "sha256": "cd" * 32,
                                     "deviations": list(deviations), "overrides": list(overrides)},
                     encoder={"path": str(tmp_path / "enc.safetensors"), "sha256": "ab" * 32, "arch": arch,
                              "technique": technique, "epochs": epochs},
                     dataset={"name": dataset, "sizes": {"train": 10, "val": 10}}, metrics=metric, seed=seed,
                     started=t, finished=t + 1.0)
    return write_record(tmp_path / "runs", rec)


def test_the_leaderboard_exists_once_in_the_package_and_is_the_file_read(tmp_path, monkeypatch):
    import mimbench.results

    assert packaged_csv() == Path(mimbench.results.__file__).resolve().parent / "leaderboard.csv"
    assert packaged_csv().is_file()
    assert not (REPO_ROOT / "results" / "leaderboard.csv").exists()  # no second copy to drift
    # load_leaderboard() with no path reads the package file (through importlib.resources), no other copy
    marked = load_leaderboard().assign(notes="read from the package")
    pkg = tmp_path / "mimbench_results"
    pkg.mkdir()
    marked.to_csv(pkg / "leaderboard.csv", index=False)
    monkeypatch.setattr("mimbench.results.leaderboard.resources.files", lambda name: pkg)
    assert set(load_leaderboard()["notes"]) == {"read from the package"}


def test_published_leaderboard_is_valid_and_has_the_reference_rows():
    df = load_leaderboard()
    assert list(df.columns) == COLUMNS
    assert leaderboard_problems(df) == []
    assert not df.duplicated(KEY).any()
    assert set(df["task"]) == {"finetune", "linear", "knn", "ade20k", "attentive", "lowshot", "robustness"}
    assert set(df["verified"]) <= {"yes", "unverified"}
    mae = df[(df.method == "MAE") & (df.arch == "vit-b/16") & (df.task == "finetune")]
    assert mae["value"].tolist() == [83.6] and mae["verified"].tolist() == ["yes"]
    assert int(mae["pretrain_epochs"].iloc[0]) == 1600
    ddae = df[(df.method == "DDAE") & (df.task == "finetune")].sort_values("value")
    assert ddae["value"].tolist() == [83.5, 84.3]
    assert (df.loc[df.method == "DDAE", "verified"] == "yes").all()
    assert df.loc[df.method == "DDAE", "pretrain_epochs"].isna().sum() == 2  # "longer": epochs not stated
    # numbers checked against their primary source, one corrected there (DINO ADE20K: 46.8, iBOT paper
    # Table 6, not the 47.2 a secondary listing gives)
    assert df.loc[df.method == "data2vec", "verified"].tolist() == ["yes"]
    dino = df[(df.method == "DINO") & (df.task == "ade20k")]
    assert dino["value"].tolist() == [46.8] and dino["verified"].tolist() == ["yes"]
    seg = df[(df.method == "MAE (mmseg)")].set_index("protocol")["value"]
    assert seg["ADE20K UperNet 160k single-scale"] == 48.13
    assert seg["ADE20K UperNet 160k multi-scale+flip"] == 48.70
    # iBOT's table gives no epochs: stored as missing, not guessed.
    assert df.loc[df.method == "iBOT", "pretrain_epochs"].isna().all()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: pd.concat([d, d.iloc[[0]]], ignore_index=True), "duplicate key"),
    (lambda d: d.assign(source=[""] + d["source"].tolist()[1:]), "no source"),
    (lambda d: d.assign(value=[101.0] + d["value"].tolist()[1:]), "not a number in 0-100"),
    (lambda d: d.assign(value=[-0.5] + d["value"].tolist()[1:]), "not a number in 0-100"),
    (lambda d: d.assign(task=["detection"] + d["task"].tolist()[1:]), "task 'detection'"),
    (lambda d: d.assign(metric=["mIoU"] + d["metric"].tolist()[1:]), "metric 'mIoU' for task"),
    (lambda d: d.assign(verified=["maybe"] + d["verified"].tolist()[1:]), "verified 'maybe'"),
    (lambda d: d.drop(columns=["source"]), "missing column"),
])
def test_validate_leaderboard_rejects_bad_tables(mutate, message):
    bad = mutate(load_leaderboard())
    with pytest.raises(MimbenchError, match=message):
        validate_leaderboard(bad)


def test_load_leaderboard_rejects_a_bad_file(tmp_path):
    text = packaged_csv().read_text().splitlines()
    (tmp_path / "dup.csv").write_text("\n".join(text + [text[1]]) + "\n")
    with pytest.raises(MimbenchError, match="duplicate key"):
        load_leaderboard(tmp_path / "dup.csv")
    with pytest.raises(MimbenchError, match="does not exist"):
        load_leaderboard(tmp_path / "missing.csv")


def test_normalize_arch():
    assert normalize_arch("vit_base_patch16_224") == "vit-b/16"
    assert normalize_arch("vit_large_patch16_224.mae") == "vit-l/16"
    assert normalize_arch("vit_huge_patch14_224") == "vit-h/14"
    assert normalize_arch("ViT-B/16") == "vit-b/16"
    assert normalize_arch("vit-d128x6/4") == "vit-d128x6/4"


def test_show_leaderboard_ranks_best_first_and_marks_own_runs(tmp_path):
    record(tmp_path, value=83.55)
    console = Console(record=True, width=250)
    df = show_leaderboard(task="finetune", arch="vit_base_patch16_224", include_runs=tmp_path / "runs",
                          console=console)
    assert df["value"].is_monotonic_decreasing
    assert set(df["arch"]) == {"vit-b/16"} and set(df["task"]) == {"finetune"}
    own = df[df["own"]]
    assert len(own) == 1 and own["method"].iloc[0] == "mae (own)" and own["pretrain_epochs"].iloc[0] == 800
    position = own.index[0]
    assert df.loc[position - 1, "value"] >= 83.55 >= df.loc[position + 1, "value"]
    published = load_leaderboard().query("task == 'finetune' and arch == 'vit-b/16'")
    expected_rank = int((published["value"] > 83.55).sum()) + 1
    assert position + 1 == expected_rank
    text = console.export_text()
    assert "* mae (own)" in text and f"{expected_rank} │ * mae (own)" in text
    assert "BEiT v2" in text and "85.50" in text


def test_show_leaderboard_names_deviations(tmp_path):
    record(tmp_path, task="linear", value=40.0, deviations=["fast linear probe: 10 epochs"],
           dataset="builtin:fashion-mnist")
    console = Console(record=True, width=300)
    df = show_leaderboard(task="linear", include_runs=tmp_path / "runs", console=console)
    own = df[df["own"]].iloc[0]
    assert own["deviations"] == ["fast linear probe: 10 epochs", "demo scale (dataset builtin:fashion-mnist)"]
    text = console.export_text()
    assert "deviates: fast linear probe: 10 epochs; demo scale" in text


def test_compare_places_a_run_between_its_neighbours(tmp_path):
    path = record(tmp_path, value=83.55)
    [res] = compare_runs([path], console=Console(record=True, width=200))
    board = load_leaderboard()
    rows = board[(board.task == "finetune") & (board.arch == "vit-b/16")
                 & (board.protocol == STANDARD_PROTOCOLS["finetune"])]
    assert res["rank"] == int((rows["value"] > 83.55).sum()) + 1 and res["of"] == len(rows) + 1
    assert "DeiT (supervised)" not in set(rows["method"])  # supervised row has its own protocol
    assert res["above"]["value"] == 83.6 and res["above"]["delta"] == pytest.approx(-0.05)
    assert res["below"]["value"] == 83.5 and res["below"]["delta"] == pytest.approx(0.05)
    assert res["above"]["source"] and res["below"]["verified"] in ("yes", "unverified")


def test_compare_top_and_segment(tmp_path):
    top = record(tmp_path, value=99.0)
    seg = record(tmp_path, task="segment", value=48.5)
    res = {r["task"]: r for r in compare_runs([top, seg], console=Console(record=True))}
    assert res["finetune"]["rank"] == 1 and res["finetune"]["above"] is None
    assert res["ade20k"]["below"]["value"] == 48.13  # single-scale rows only: 48.70 is multi-scale
    assert res["ade20k"]["above"]["value"] == 49.3


@pytest.mark.parametrize("kwargs, message", [
    (dict(deviations=["epochs 100 -> 2"]), "does not follow the published finetune protocol"),
    (dict(dataset="builtin:fashion-mnist"), "demo scale"),
    (dict(arch="vit-d128x6/4"), "different architecture"),
    (dict(arch="vit-s/16"), "no finetune rows for vit-s/16"),
    (dict(overrides=["schedule.epochs=10"]), r"override schedule\.epochs=10"),
])
def test_compare_refuses_incomparable_runs(tmp_path, kwargs, message):
    path = record(tmp_path, **kwargs)
    with pytest.raises(MimbenchError, match=message):
        compare_runs([path], console=Console(record=True))


def test_compare_needs_records(tmp_path):
    with pytest.raises(MimbenchError, match="No run records"):
        compare_runs([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimbenchError, match="No rankable run records"):
        compare_runs([tmp_path / "empty"], console=Console(record=True))


def test_show_leaderboard_unknown_filters():
    with pytest.raises(MimbenchError, match="Unknown task 'detection'"):
        show_leaderboard(task="detection", console=Console(record=True))
    with pytest.raises(MimbenchError, match=r"No knn results for architecture 'vit-l/16'.*\n.*vit-b/16"):
        show_leaderboard(task="knn", arch="vit-l/16", console=Console(record=True))


def test_bookkeeping_overrides_keep_a_run_comparable(tmp_path):
    path = record(tmp_path, overrides=["num_workers=16", "default_hooks.checkpoint.interval=4000", "cache_dir='/x'"])
    (res,) = compare_runs([path], console=Console(record=True))
    assert res["above"]["value"] > 83.55 >= res["below"]["value"]


def test_attentive_rows_carry_their_sources_under_their_head_presets_protocol():
    df = load_leaderboard()
    rows = df[df.task == "attentive"]
    got = {(r.method, r.arch, r.protocol): r.value for r in rows.itertuples()}
    cae, ep, vjepa = (ATTENTIVE_PROTOCOLS[p] for p in ("cae", "ep", "vjepa"))
    aim_last, aim_best = (f"IN-1k attentive probe 224 (AIM head; {b})" for b in ("last block", "best blocks"))
    assert got == {("MAE", "vit-b/16", cae): 74.2, ("MAE", "vit-l/16", cae): 78.8,
                   ("MAE", "vit-b/16", ep): 75.46, ("MAE", "vit-l/16", ep): 79.52,
                   ("V-JEPA", "vit-l/16", vjepa): 74.8, ("V-JEPA", "vit-h/16", vjepa): 75.9,
                   # apple/ml-aim aim-v1/README.md, attention heads: last layer / best layer
                   ("AIM", "aim-0.6b", aim_last): 78.5, ("AIM", "aim-0.6b", aim_best): 79.4,
                   ("AIM", "aim-1b", aim_last): 80.6, ("AIM", "aim-1b", aim_best): 82.3,
                   ("AIM", "aim-3b", aim_last): 82.2, ("AIM", "aim-3b", aim_best): 83.3,
                   ("AIM", "aim-7b", aim_last): 82.4, ("AIM", "aim-7b", aim_best): 84.0}
    assert rows.loc[rows.method == "AIM", "source"].str.contains("apple/ml-aim aim-v1/README.md").all()
    assert rows.loc[rows.method == "AIM", "pretrain_epochs"].isna().all()  # not pre-trained on ImageNet-1k
    # V-JEPA's two rows come from a secondary summary: kept, marked unverified
    assert rows.loc[rows.method == "V-JEPA", "verified"].tolist() == ["unverified", "unverified"]
    assert rows.loc[rows.protocol == cae, "source"].str.contains("Atten4Vis/CAE README.md").all()
    assert rows.loc[rows.protocol == ep, "source"].str.contains("efficient-probing results.csv").all()
    assert rows.loc[rows.protocol == vjepa, "source"].str.contains("facebookresearch/jepa").all()
    assert (rows.loc[rows.method == "MAE", "verified"] == "yes").all()


def _attentive(tmp_path, preset, value, arch="vit-b/16"):
    t = time.time()
    rec = new_record("attentive", protocol={"name": f"attentive/{preset}_vit-b_in1k", "sha256": "cd" * 32,
                                            "deviations": [], "head_preset": preset},
                     encoder={"path": str(tmp_path / "enc.safetensors"), "sha256": "ab" * 32, "arch": arch,
                              "technique": "mae", "epochs": 1600.0},
                     dataset={"name": "imagenet", "sizes": {"train": 10, "val": 10}}, metrics={"top1": value},
                     seed=0, started=t, finished=t + 1.0)
    return write_record(tmp_path / preset, rec)


def test_an_attentive_run_is_ranked_only_among_rows_of_its_head_preset(tmp_path):
    console = Console(record=True, width=200)
    ep, cae = (compare_runs([_attentive(tmp_path, p, 75.0)], console=console)[0] for p in ("ep", "cae"))
    # EP ViT-B has one published row (75.46): 75.0 is below it; CAE's head has 74.2: 75.0 is above it
    assert (ep["rank"], ep["of"], ep["above"]["value"], ep["below"]) == (2, 2, 75.46, None)
    assert (cae["rank"], cae["of"], cae["above"], cae["below"]["value"]) == (1, 2, None, 74.2)
    assert ep["protocol"] == ATTENTIVE_PROTOCOLS["ep"] and ATTENTIVE_PROTOCOLS["cae"] in console.export_text()
    with pytest.raises(MimbenchError, match="no attentive rows for vit-b/16 under 'IN-1k attentive probe 224 "
                                            r"\(V-JEPA head\)'"):
        compare_runs([_attentive(tmp_path, "vjepa", 75.0)], console=console)


def test_low_shot_rows_carry_mim_refiners_table_with_the_classifier_left_unstated():
    """MIM-Refiner's low-shot table (arXiv 2402.10093, shown in ml-jku/MIM-Refiner docs/imgs/in1k_lowshot.png): MAE
    1/2/5 images per class, 1 % and 10 % of the labels; the classifier of each cell is not stated."""
    df = load_leaderboard()
    rows = df[df.task == "lowshot"]
    assert set(rows["protocol"]) == set(LOWSHOT_PROTOCOLS.values())
    assert all("classifier not stated" in p for p in LOWSHOT_PROTOCOLS.values())
    order = [LOWSHOT_PROTOCOLS[k] for k in ("1-shot", "2-shot", "5-shot", "1%", "10%")]
    got = {arch: [rows[(rows.arch == arch) & (rows.protocol == p)]["value"].item() for p in order]
           for arch in ("vit-l/16", "vit-h/14", "vit-2b/14")}
    assert got == {"vit-l/16": [14.3, 34.9, 56.9, 67.7, 79.3], "vit-h/14": [7.2, 14.1, 40.2, 72.8, 81.2],
                   "vit-2b/14": [17.8, 29.1, 62.9, 73.6, 82.0]}
    assert len(rows) == 15 and set(rows["method"]) == {"MAE"} and set(rows["metric"]) == {"top1"}
    assert rows["source"].str.contains("MIM-Refiner").all() and rows["source"].str.contains("2402.10093").all()
    assert (rows["verified"] == "yes").all()
    epochs = rows.set_index("arch")["pretrain_epochs"]
    assert (epochs.loc[["vit-l/16", "vit-h/14"]] == 1600).all() and epochs.loc["vit-2b/14"].isna().all()
    table = show_leaderboard(task="lowshot", arch="vit-h/14", console=Console(record=True, width=250))
    assert table["value"].tolist() == [81.2, 72.8, 40.2, 14.1, 7.2]  # best first
def test_mae_table_13_robustness_rows_with_their_sources():
    """MAE Table 13 (the IN-1k fine-tuned weights on ImageNet-C / -A / -R / -Sketch) and the supervised baselines of
    its appendix, one row per set under the set's protocol name; mCE ranks lowest first."""
    df = load_leaderboard()
    rob = df[df.task == "robustness"]
    assert set(rob.metric) == {"mce", "top1"} and (rob.loc[rob.protocol.str.startswith("in-c"), "metric"] == "mce").all()
    mae = rob[rob.method == "MAE"]
    assert (mae.source.str.contains("Table 13")).all() and (mae.verified == "yes").all()
    assert (mae.pretrain_epochs == 1600).all()

    def values(frame, protocol):
        rows = frame[frame.protocol == protocol].set_index("arch")["value"]
        return [float(rows[a]) for a in ("vit-b/16", "vit-l/16", "vit-h/14") if a in rows.index]

    assert values(mae, "in-c") == [51.7, 41.8, 33.8]
    assert values(mae, "in-a") == [35.9, 57.1, 68.2]
    assert values(mae, "in-r") == [48.3, 59.9, 64.4]
    assert values(mae, "sketch") == [34.5, 45.3, 49.6]
    at448 = mae[mae.protocol.str.endswith("@448")].set_index("protocol")["value"]
    assert at448.to_dict() == {"in-c @448": 36.8, "in-a @448": 76.7, "in-r @448": 66.5, "sketch @448": 50.9}
    assert set(mae[mae.protocol.str.endswith("@448")].arch) == {"vit-h/14"}
    sup = rob[rob.method == "Supervised ViT (MAE appendix)"]
    assert values(sup, "in-c") == [45.8, 42.3, 41.3]
    assert values(sup, "in-a") == [27.2, 29.6, 33.1]
    assert values(sup, "in-r") == [49.4, 50.9, 50.3]
    assert values(sup, "sketch") == [35.6, 37.5, 38.0]
    assert sup.source.str.contains("appendix").all()
    # ranked: within a (task, arch), top-1 rows best first, then mCE lowest first
    table = show_leaderboard(task="robustness", arch="vit-h/14", console=Console(file=io.StringIO()))
    mce = table[table.metric == "mce"]["value"].tolist()
    assert mce == sorted(mce) and mce[0] == 33.8
    top1 = table[table.metric == "top1"]["value"].tolist()
    assert top1 == sorted(top1, reverse=True)


def test_mae_figure_9_points_stated_in_the_text_with_their_source():
    from mimbench.results.leaderboard import partial_ft_protocol

    df = load_leaderboard()
    pft = df[df.protocol.str.startswith("partial-ft")]
    assert set(pft.task) == {"finetune"} and set(pft.arch) == {"vit-l/16"} and set(pft.method) == {"MAE"}
    assert pft.set_index("protocol")["value"].to_dict() == {
        partial_ft_protocol(0): 73.5, partial_ft_protocol("mlp"): 79.1, partial_ft_protocol(1): 81.0}
    assert pft.source.str.contains("Figure 9").all()
    moco = df[(df.method == "MoCo v3") & (df.arch == "vit-l/16") & (df.task == "linear")]
    assert moco["value"].tolist() == [77.6] and "Figure 9" in moco["source"].iloc[0]
    assert moco["protocol"].tolist() == [STANDARD_PROTOCOLS["linear"]]
    assert [partial_ft_protocol(k) for k in (0, 1, 4, "mlp", "all")] == [
        "partial-ft (0 blocks)", "partial-ft (1 block)", "partial-ft (4 blocks)", "partial-ft (last MLP)",
        "partial-ft (all blocks)"]


def test_a_metric_outside_the_tasks_is_refused():
    df = load_leaderboard()
    bad = df.copy()
    bad.loc[bad.index[0], "metric"] = "mce"  # a fine-tune row cannot hold an mCE
    assert any("metric 'mce' for task finetune" in p for p in leaderboard_problems(bad))
