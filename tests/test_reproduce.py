"""`mimbench reproduce`: ablation grids, full-scale job files, demo orchestration."""
from __future__ import annotations

import inspect
import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mimbench import paths
from mimbench import reproduce as R
from mimbench.config import load_config, parse_override
from mimbench.errors import MimbenchError
from mimbench.jobs import full_evals

MAE_CFG = """technique = "mae"
model = dict(name="mae_vit_micro_patch4_32", decoder_attn_drop=0.0, target_norm="patch",
             mask_token_layer=None, mask_token_ratio=0.0)
optim = dict(lr=1.5e-4)
"""
MAE_DDS_CFG = """technique = "mae+dds"
model = dict(name="mae+dds_vit_micro_patch4_32", target_norm="patch")
"""
DDAE_CFG = """technique = "ddae"
model = dict(name="ddae_vit_micro_patch4_32", target_norm="patch", dds_depths=None,
             dds_beta_mode="learnable", dds_beta_start=-1.0, distill_weight=1.0)
"""
VQKD_CFG = """technique = "vqkd"
model = dict(name="vqkd_vit_tiny_patch4_32", teacher=None)
"""
BEITV2_CFG = """technique = "beitv2"
model = dict(name="beitv2_vit_tiny_patch4_32", tokenizer="tokenizer.safetensors")
"""
BEITV2_DDS_CFG = """technique = "beitv2+dds"
model = dict(name="beitv2+dds_vit_tiny_patch4_32", tokenizer="tokenizer.safetensors")
"""


@pytest.fixture()
def fake_repo(tmp_path, monkeypatch):
    """A repository root with one MAE and one DDAE config per scale (micro ViT, depth 4) and the real demo
    evaluation configs (with the ``_base_`` files they inherit)."""
    import shutil

    from mimbench import paths

    root = tmp_path / "repo"
    texts = {"mae": MAE_CFG, "mae_dds": MAE_DDS_CFG, "ddae": DDAE_CFG, "vqkd": VQKD_CFG, "beitv2": BEITV2_CFG,
             "beitv2_dds": BEITV2_DDS_CFG}
    for scale, roles in R.BASE_CONFIGS.items():
        for role, candidates in roles.items():
            (root / candidates[0]).parent.mkdir(parents=True, exist_ok=True)
            (root / candidates[0]).write_text(texts[role])
    for _, cfg in R.demo_evals():
        (root / cfg).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths.REPO_ROOT / cfg, root / cfg)
    shutil.copytree(paths.REPO_ROOT / paths.EVAL_CONFIGS / "_base_", root / paths.EVAL_CONFIGS / "_base_")  # inherited
    monkeypatch.setattr(paths, "REPO_ROOT", root)
    return root


def _model_kwargs(cfg) -> tuple[str, dict]:
    kwargs = dict(cfg.model)
    return kwargs.pop("name"), kwargs


def test_robust_mae_grid_has_every_factor_and_level(fake_repo):
    grid = R.build_grid("robust-mae", "demo")
    by_factor: dict[str, list[str]] = {}
    for row in grid.rows:
        by_factor.setdefault(row.factor, []).append(row.setting)
    assert by_factor["decoder attention dropout"] == ["0", "0.1", "0.2"]
    assert by_factor["target normalisation"] == ["none", "patch", "batch", "ema"]
    tokens = by_factor["mask tokens (layer, ratio)"]
    depth = 4
    for layer in (0, depth // 2, depth):
        for ratio in ("0.5", "1"):
            assert f"({layer}, {ratio})" in tokens
    assert "all three" in by_factor
    assert by_factor["control"] == ["random init (no pre-training)"]
    assert len([p for p in grid.points if p.pretrain]) == 13
    # every setting resolves to the knob values it claims
    points = {p.name: dict(parse_override(o) for o in p.overrides) for p in grid.points}
    assert points["attn_drop0.2"]["model.decoder_attn_drop"] == 0.2
    assert points["attn_drop0.2"]["technique"] == "mae (attn_drop0.2)"
    assert points["target_ema"]["model.target_norm"] == "ema"
    assert points["mask_tokens_l2_r1"]["model.mask_token_layer"] == 2
    assert points["mask_tokens_l2_r1"]["model.mask_token_ratio"] == 1.0
    assert points["mae"] == {"model.decoder_attn_drop": 0.0, "model.target_norm": "patch",
                             "model.mask_token_layer": depth, "model.mask_token_ratio": 0.0}


def test_ddae_grid_has_every_ablation(fake_repo):
    grid = R.build_grid("ddae", "demo")
    factors = {row.factor for row in grid.rows}
    assert factors == {"control", "plug-in", "deep supervision", "dynamic weighting", "self-distillation"}
    points = {p.name: (p.base, dict(parse_override(o) for o in p.overrides)) for p in grid.points}
    assert points["mae"] == ("mae", {})
    assert points["mae_dds"] == ("mae_dds", {})
    assert points["ddae"] == ("ddae", {})

    def knobs(name):
        base, over = points[name]
        assert base == "ddae" and over.pop("technique") == f"ddae ({name})"
        return over

    assert knobs("ddae_no_deep_supervision") == {"model.dds_depths": [4]}
    assert knobs("ddae_no_dynamic_weighting") == {"model.dds_beta_mode": "fixed", "model.dds_beta_start": 0.0}
    assert knobs("ddae_scheduled_beta") == {"model.dds_beta_mode": "scheduled"}
    assert knobs("ddae_no_self_distillation") == {"model.distill_weight": 0.0}
    # the paper's ImageNet numbers sit on the full DDAE only
    assert {p.name for p in grid.points if p.paper} == {"ddae"}
    assert set(R.DDAE_PAPER.values()) == {83.5, 84.3, 49.3}


@pytest.mark.parametrize("paper", R.PAPERS)
def test_grid_points_are_distinct_and_rows_resolve(fake_repo, paper):
    grid = R.build_grid(paper, "demo")
    names = [p.name for p in grid.points]
    assert len(names) == len(set(names))
    settings = [(p.base, frozenset(p.overrides), p.pretrain) for p in grid.points]
    assert len(settings) == len(set(settings)), "two grid points would train the same model"
    evaluated = {p.name for p in grid.points if p.evaluate}  # a prerequisite (BEiT v2's tokenizer) has no row
    assert {row.point for row in grid.rows} == evaluated, "every point appears in the table, every row has a point"


@pytest.mark.parametrize("paper", R.PAPERS)
def test_every_point_loads_and_builds_its_model(fake_repo, paper):
    import pretrain

    grid = R.build_grid(paper, "demo")
    for i, point in enumerate(grid.points):
        cfg = load_config(grid.base_paths[point.base], point.overrides)  # refuses unknown keys
        files = [o for o in point.overrides if "{runs}/" in o]
        if files:  # it reads a file an earlier point writes (BEiT v2's tokenizer, the tokenizer's teacher)
            earlier = {p.name for p in grid.points[:i]}
            assert all(o.split("{runs}/")[1].split("/")[0] in earlier for o in files), point.name
            continue
        name, kwargs = _model_kwargs(cfg)
        model = pretrain.create_model(name, **kwargs)
        for key, value in (parse_override(o) for o in point.overrides):
            if key == "technique":
                continue
            knob = key.split(".", 1)[1]
            if knob == "dds_depths":
                assert list(model.dds_depths) == value
            elif knob == "target_norm":
                assert model.target_normalizer.mode == value
            elif hasattr(model, knob):
                assert getattr(model, knob) == value, (point.name, knob)


def _real_grid(paper: str, scale: str, quick: bool = False):
    try:
        return R.build_grid(paper, scale, quick=quick)
    except MimbenchError as exc:
        if "config for scale" in exc.problem:
            pytest.skip(f"pre-training configs not present: {exc.problem}")
        raise


@pytest.mark.parametrize("scale,quick", [("demo", False), ("demo", True), ("full", False)])
@pytest.mark.parametrize("paper", R.PAPERS)
def test_override_keys_exist_in_the_repository_configs(paper, scale, quick):
    grid = _real_grid(paper, scale, quick)
    for point in grid.points:
        load_config(grid.base_paths[point.base], point.overrides)


def test_full_scale_writes_configs_commands_and_sbatch(fake_repo, tmp_path, capsys):
    out = tmp_path / "out"
    root = R.run_reproduce("ddae", scale="full", out=out)
    assert root == out / "ddae"
    assert "commands.sh" in capsys.readouterr().out
    grid = R.build_grid("ddae", "full")
    trained = [p for p in grid.points if p.pretrain]
    assert [p.name for p in grid.points if not p.pretrain] == ["random_init"]
    commands = (root / "commands.sh").read_text()
    pretrain_lines = [ln for ln in commands.splitlines() if ln.startswith("torchrun") and " pretrain " in ln]
    assert len(pretrain_lines) == len(trained) == 9  # 7 MAE-family points + BEiT v2 and BEiT v2 + DDS
    assert sorted(p.stem for p in (root / "configs").iterdir()) == sorted(p.name for p in trained)
    for point, line in zip(trained, pretrain_lines):
        words = shlex.split(line)
        assert words[:5] == ["torchrun", "--nproc_per_node=8", "-m", "mimbench.cli", "pretrain"]
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert sets == list(point.overrides)
        assert words[words.index("--config") + 1] == R.BASE_CONFIGS["full"][point.base][0]
        assert words[words.index("--data") + 1] == "$IMAGENET"
        resolved = load_config(root / "configs" / f"{point.name}.py")
        expected = load_config(grid.base_paths[point.base], point.overrides)
        assert resolved.model.to_dict() == expected.model.to_dict()
        sbatch = (root / "sbatch" / f"{point.name}.sbatch").read_text()
        assert sbatch.startswith("#!/bin/bash")
        for needle in ("#SBATCH --nodes=", "#SBATCH --gpus-per-node=", "#SBATCH --time=", "GPUS_PER_NODE=",
                       "$SLURM_JOB_NODELIST", "srun torchrun", "--rdzv_backend=c10d", "--rdzv_endpoint="):
            assert needle in sbatch, needle
        assert all(shlex.quote(o) in sbatch for o in point.overrides)
    for task in ("finetune", "linear", "segment"):
        assert commands.count(f"mimbench.cli eval {task} ") == len(trained)
    assert "--launcher pytorch" in commands
    assert commands.rstrip().endswith('mimbench report "$RUNS" --format md')
    everything = commands + "".join(p.read_text() for p in (root / "sbatch").iterdir())
    everything += "".join(p.read_text() for p in (root / "configs").iterdir())
    assert str(tmp_path) not in everything and "/home/" not in everything and "/work/" not in everything
    for script in [root / "commands.sh", *(root / "sbatch").iterdir()]:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_job_files_read_earlier_points_files_and_skip_a_prerequisites_evaluations(fake_repo, tmp_path):
    """A grid whose points read files of earlier points ({runs}/<point>/<file>: BEiT v2's tokenizer and its
    teacher) as job files: the shell expands the path to the earlier point's --out folder."""
    from mimbench.jobs import write_full_grid

    grid = R.build_grid("ddae", "demo")
    root = write_full_grid(grid, tmp_path / "out")
    commands = (root / "commands.sh").read_text()
    everything = commands + "".join(p.read_text() for p in (root / "sbatch").iterdir())
    assert "{runs}" not in everything
    lines = {}
    for line in commands.splitlines():
        if line.startswith("torchrun") and " pretrain " in line:
            expanded = subprocess.run(["bash", "-c", "RUNS=/r; IMAGENET=/i; printf '%s\\n' "
                                       + line.split(" ", 2)[2]], capture_output=True, text=True, check=True)
            words = expanded.stdout.splitlines()
            lines[words[words.index("--out") + 1]] = words
    vqkd, beit = lines["/r/encoders/vqkd"], lines["/r/encoders/beitv2"]
    assert "/r/encoders/mae" in lines
    assert 'model.teacher="/r/encoders/mae/encoder.safetensors"' in vqkd
    assert 'model.tokenizer="/r/encoders/vqkd/tokenizer.safetensors"' in beit
    # the tokenizer is a prerequisite: trained, never evaluated; BEiT v2 is evaluated like every other point
    assert "$RUNS/evals/vqkd/" not in commands and "$RUNS/encoders/vqkd/encoder" not in commands
    assert commands.count("$RUNS/evals/beitv2/") == 3
    for script in [root / "commands.sh", *(root / "sbatch").iterdir()]:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_unknown_paper_and_scale_are_refused():
    with pytest.raises(MimbenchError) as exc:
        R.run_reproduce("beit", scale="demo")
    assert "robust-mae" in str(exc.value) and "ddae" in str(exc.value)
    with pytest.raises(MimbenchError, match="scale"):
        R.run_reproduce("ddae", scale="huge")


def test_cli_call_shape_is_valid():
    sig = inspect.signature(R.run_reproduce)
    sig.bind("ddae", scale="demo")
    assert sig.parameters["out"].default == Path("runs/reproduce")
    assert sig.parameters["quick"].default is False


def test_table_keeps_paper_numbers_apart(fake_repo):
    grid = R.build_grid("ddae", "demo")
    table = R.tabulate(grid, {"ddae": {"knn": 71.234, "linear": 75.0}, "mae": {"knn": 70.0, "linear": None}},
                       ["knn", "linear"])
    lines = table.splitlines()
    assert "knn (demo)" in lines[0] and "paper (IN-1k) finetune IN-1k @100ep" in lines[0]
    ddae_rows = [ln for ln in lines if "| ddae |" in ln]
    assert len(ddae_rows) == 3 and all("71.23" in ln and "83.5" in ln for ln in ddae_rows)
    mae_row = next(ln for ln in lines if "| mae |" in ln)
    assert "70.00" in mae_row and "83.5" not in mae_row and "| - |" in mae_row
    assert "not comparable" in table


def _fake_pipeline(monkeypatch, calls):
    """Pre-training and evaluation stand-ins that write what the real ones write (an encoder file carrying the
    resolved config's hash; a record carrying the protocol's and the encoder's hashes), in milliseconds."""
    from mimbench.config import config_sha256, load_config
    from mimbench.control import build_control
    from mimbench.encoders import encoder_sha256

    def run_pretrain(config, data, out, overrides, resume=False):
        calls.append(("pretrain", Path(out).name, tuple(overrides)) + (("resume",) if resume else ()))
        cfg = load_config(config, list(overrides))
        if cfg.model.name.startswith(("vqkd", "beitv2")):  # their own file formats: a stand-in with the hash
            import torch
            from safetensors.torch import save_file

            path = Path(out) / ("tokenizer.safetensors" if cfg.model.name.startswith("vqkd") else "encoder.safetensors")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.zeros(1)}, str(path), metadata=dict(technique=str(cfg.technique),
                                                                        config_sha256=config_sha256(cfg)))
            return path
        path = build_control(Path(out) / "encoder.safetensors", config=config, overrides=overrides)
        # an encoder as pre-training exports it: technique of the config, its resolved config's hash
        from safetensors.torch import load_file, save_file
        from mimbench.encoders import read_metadata

        meta = dict(read_metadata(path))
        meta.update(technique="mae", epochs="1.0",
                    config_sha256=config_sha256(load_config(config, list(overrides))))
        save_file(load_file(str(path)), str(path), metadata=meta)
        return path

    def run_eval(task, *, encoder, config, data, out, overrides, resume):
        calls.append((task, Path(out).parent.name))
        record = {"status": "ok", "metrics": {"top1": 50.0 if task == "knn" else 60.0},
                  "protocol": {"sha256": config_sha256(load_config(config, list(overrides)))},
                  "encoder": {"sha256": encoder_sha256(encoder)}}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{task}-record.json").write_text(json.dumps(record))
        return record

    monkeypatch.setitem(sys.modules, "pretrain.main", types.SimpleNamespace(run_pretrain=run_pretrain))
    monkeypatch.setattr("mimbench.evals.run_eval", run_eval)


def test_demo_runs_each_step_once_and_reuses_finished_ones(fake_repo, tmp_path, monkeypatch):
    calls = []
    _fake_pipeline(monkeypatch, calls)
    grid = R.build_grid("ddae", "demo")
    table = R.run_demo_grid(grid, tmp_path / "runs", points=["mae_dds"], log=lambda s: None)
    assert calls == [("pretrain", "mae_dds", ()), ("knn", "mae_dds"), ("linear", "mae_dds")]
    assert "| mae_dds | 50.00 | 60.00 |" in table.read_text()
    assert "Reused" not in table.read_text()
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae_dds"], log=lambda s: None)
    assert calls == []
    assert "3 of 3 steps: pre-train mae_dds, knn on mae_dds, linear on mae_dds" in table.read_text()
    # the control is exported at initialisation, never pre-trained, and evaluated like the others
    R.run_demo_grid(grid, tmp_path / "runs", points=["random_init"], log=lambda s: None)
    assert calls == [("knn", "random_init"), ("linear", "random_init")]
    from mimbench.encoders import load_encoder, read_metadata

    enc = tmp_path / "runs" / "ddae" / "encoders" / "random_init" / "encoder.safetensors"
    assert read_metadata(enc)["technique"] == "random-init"
    assert load_encoder(enc).embed_dim == 64
    # BEiT v2's tokenizer is trained from the MAE point's encoder and never evaluated; the BEiT v2 points
    # read it from its run folder
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["vqkd", "beitv2"], log=lambda s: None)
    runs = tmp_path / "runs" / "ddae" / "encoders"
    assert calls == [("pretrain", "vqkd", (f'model.teacher="{runs}/mae/encoder.safetensors"',)),
                     ("pretrain", "beitv2", (f'model.tokenizer="{runs}/vqkd/tokenizer.safetensors"',)),
                     ("knn", "beitv2"), ("linear", "beitv2")]
    calls.clear()  # the tokenizer is reused like an encoder: same config, same overrides
    R.run_demo_grid(grid, tmp_path / "runs", points=["vqkd", "beitv2"], log=lambda s: None)
    assert calls == []


def test_reproduce_redoes_a_step_whose_config_changed_and_reuses_one_whose_hashes_match(
        fake_repo, tmp_path, monkeypatch):
    calls = []
    _fake_pipeline(monkeypatch, calls)
    grid = R.build_grid("ddae", "demo")
    lines = []
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae", "mae_dds"], log=lines.append)
    assert [c[0] for c in calls] == ["pretrain", "knn", "linear"] * 2
    first_mae = (tmp_path / "runs" / "ddae" / "encoders" / "mae" / "encoder.safetensors").read_bytes()

    # the MAE pre-training config changes: MAE is pre-trained and evaluated again (its encoder's hash changed
    # with it); MAE+DDS, whose config, overrides and encoder are unchanged, is reused step by step
    mae_cfg = fake_repo / R.BASE_CONFIGS["demo"]["mae"][0]
    mae_cfg.write_text(mae_cfg.read_text().replace("lr=1.5e-4", "lr=3e-4"))
    calls.clear()
    lines.clear()
    table = R.run_demo_grid(grid, tmp_path / "runs", points=["mae", "mae_dds"], log=lines.append)
    assert calls == [("pretrain", "mae", ()), ("knn", "mae"), ("linear", "mae")]
    assert (tmp_path / "runs" / "ddae" / "encoders" / "mae" / "encoder.safetensors").read_bytes() != first_mae
    assert sum(line.startswith("reusing") for line in lines) == 3
    assert sum(line.startswith("redoing") for line in lines) == 3
    assert "3 of 6 steps: pre-train mae_dds, knn on mae_dds, linear on mae_dds" in table.read_text()

    # an evaluation config changes: only the evaluations are redone, the encoders are reused
    knn_cfg = fake_repo / R.demo_evals()[0][1]
    knn_cfg.write_text(knn_cfg.read_text() + "\nbatch_size = 128\n")
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae", "mae_dds"], log=lambda s: None)
    assert calls == [("knn", "mae"), ("knn", "mae_dds")]

    # a record left by another encoder file (same config) is not reused either
    record = next((tmp_path / "runs" / "ddae" / "evals" / "mae_dds" / "linear").glob("*.json"))
    stale = json.loads(record.read_text())
    stale["encoder"]["sha256"] = "0" * 64
    record.write_text(json.dumps(stale))
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae", "mae_dds"], log=lambda s: None)
    assert calls == [("linear", "mae_dds")]

    # an interrupted pre-training of these very settings resumes from its checkpoint; one of other settings restarts
    folder = tmp_path / "runs" / "ddae" / "encoders" / "mae"
    (folder / "encoder.safetensors").unlink()
    (folder / "checkpoint-latest.pt").write_bytes(b"")
    load_config(mae_cfg).dump(str(folder / "config.py"))
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae"], log=lambda s: None)
    assert calls[0] == ("pretrain", "mae", (), "resume")
    (folder / "encoder.safetensors").unlink()
    load_config(mae_cfg, ["optim.lr=1.0"]).dump(str(folder / "config.py"))
    calls.clear()
    R.run_demo_grid(grid, tmp_path / "runs", points=["mae"], log=lambda s: None)
    assert calls[0] == ("pretrain", "mae", ()) and not (folder / "checkpoint-latest.pt").exists()


@pytest.mark.slow
def test_demo_end_to_end_on_one_micro_point(tmp_path):
    try:
        from mimbench.evals import run_eval  # noqa: F401
        from pretrain.main import run_pretrain  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"pre-training or evaluation entry point not present: {exc}")
    grid = _real_grid("ddae", "demo", quick=True)
    table = R.run_demo_grid(grid, tmp_path, points=["mae"], log=lambda s: None, pretrain_overrides=["data.limit=512"])
    results = json.loads((tmp_path / "ddae" / "results.json").read_text())
    assert (tmp_path / "ddae" / "encoders" / "mae" / "encoder.safetensors").is_file()
    assert set(results) == {"mae"}
    assert all(isinstance(results["mae"][t], float) and 0 <= results["mae"][t] <= 100 for t in ("knn", "linear"))
    assert "| mae |" in table.read_text()


def test_no_deep_supervision_stays_valid_with_explicit_depth_lists(fake_repo):
    import pretrain

    cfg_path = fake_repo / R.BASE_CONFIGS["demo"]["ddae"][0]
    cfg_path.write_text('model = dict(name="ddae_vit_micro_patch4_32", dds_depths=[2, 4], dds_weights=[0.5, 1.0], '
                        'distill_depths=[2, 4], dds_beta_mode="learnable", dds_beta_start=-1.0, distill_weight=1.0)\n')
    point = next(p for p in R.build_grid("ddae", "demo").points if p.name == "ddae_no_deep_supervision")
    name, kwargs = _model_kwargs(load_config(cfg_path, point.overrides))
    model = pretrain.create_model(name, **kwargs)
    assert model.dds_depths == (4,) and model.distill_depths == (4,) and model.dds_weights == (1.0,)


def test_ddae_grid_gives_mae_rows_the_ddae_budget(fake_repo):
    for role, epochs in (("mae", 800), ("ddae", 100)):
        path = fake_repo / R.BASE_CONFIGS["full"][role][0]
        path.write_text(path.read_text() + f"schedule = dict(epochs={epochs}, warmup_epochs={epochs // 20})\n")
    points = {p.name: p for p in R.build_grid("ddae", "full").points}
    assert points["mae"].overrides == ("schedule.epochs=100", "schedule.warmup_epochs=5")
    assert points["mae_dds"].overrides == ()  # its config has no budget keys here
    assert points["ddae"].overrides == ()


@pytest.mark.parametrize("task,config,data", full_evals())
def test_full_scale_evaluation_configs_exist(task, config, data):
    path = paths.REPO_ROOT / config
    if not path.parent.is_dir():
        pytest.skip(f"{path.parent} not present in this checkout")
    assert path.is_file(), f"{config} is named in the full-scale commands but missing"
    assert data in ("$IMAGENET", "$ADE20K")


@pytest.mark.parametrize("name", ["ddae_tiny_fmnist", "ddae_micro_fmnist", "ddae_vit-b_in1k_100ep"])
def test_reproduce_ddae_bases_only_write_out_model_defaults(name):
    from pretrain.models.ddae import DDAE, MAEWithDDS

    base = load_config(paths.REPO_ROOT / "eval_configs" / "reproduce" / f"{name}.py")
    parent = load_config(paths.REPO_ROOT / "pretrain" / "configs" / f"{name}.py")
    defaults = {**{k: p.default for k, p in inspect.signature(MAEWithDDS.__init__).parameters.items()},
                **{k: p.default for k, p in inspect.signature(DDAE.__init__).parameters.items()}}
    added = {k: v for k, v in base.model.items() if k not in parent.model}
    assert added and all(defaults[k] == v for k, v in added.items()), added
    assert {k: v for k, v in base.model.items() if k in parent.model} == dict(parent.model)
    assert base.to_dict().keys() == parent.to_dict().keys()
