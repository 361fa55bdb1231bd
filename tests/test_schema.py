"""The schema is the one place of every default and every allowed value: each leaf carries one default (or is
required), ``load_config(kind=...)`` fills what a config leaves out, the modules and the CLI read the allowed
values from it, and a config's hash does not depend on the filling."""
import typing

import pytest
from typer.testing import CliRunner

from mimbench import cli, fastpath, schema
from mimbench.errors import MimbenchError
from mimbench.config import as_written, config_sha256, load_config, written_text
from mimbench.evals import finetune, linear
from mimbench.schema import FILLED_KINDS, REQUIRED, RUNTIME_KEYS, SCHEMAS, Section

#: The smallest config of each kind: its required keys only (values within range).
MINIMAL = {
    "pretrain": "model = dict(name='mae_vit_tiny_patch4_32')\noptim = dict(blr=1e-3, batch_size=8)\n"
                "schedule = dict(epochs=2, warmup_epochs=1)\n",
    "linear": "optim = dict(lr=1e-3, batch_size=8)\nschedule = dict(epochs=2, warmup_epochs=1)\n",
    "finetune": "model = dict(drop_path=0.1)\noptim = dict(lr=1e-3, batch_size=8, weight_decay=0.05, layer_decay=0.75)\n"
                "schedule = dict(epochs=2, warmup_epochs=1)\nmixup = dict(mixup=0.8, cutmix=1.0, smoothing=0.1)\n",
    "knn": "# every k-NN key has a default\n",
    "lowshot": "# every low-shot key has a default\n",
    "attentive": "head = dict(preset='ep')\noptim = dict(name='adamw', lr=1e-3, batch_size=8)\n"
                 "schedule = dict(epochs=2, warmup_epochs=1)\n",    "robustness": "# every robustness key has a default\n",
}


def _leaves(section: Section, prefix: str = ""):
    """(dotted key, leaf, required) of every leaf below ``section``."""
    for key, spec in section.keys.items():
        if isinstance(spec, Section):
            yield from _leaves(spec, f"{prefix}{key}.")
        else:
            yield prefix + key, spec, key in section.required


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _has(cfg: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if part not in cfg:
            return False
        cfg = cfg[part]
    return True


def _minimal(tmp_path, kind: str, extra: str = ""):
    path = tmp_path / f"{kind}.py"
    path.write_text(MINIMAL[kind] + extra)
    return path


@pytest.mark.parametrize("kind", FILLED_KINDS)
def test_every_leaf_has_one_default_or_is_required_and_load_config_fills_it(tmp_path, kind):
    leaves = list(_leaves(SCHEMAS[kind]))
    assert leaves
    for dotted, spec, required in leaves:
        assert required != spec.has_default, f"{kind}.{dotted}: required and a default are exclusive"
        if spec.has_default:
            assert spec.problem(spec.default) is None, f"{kind}.{dotted}: its default {spec.default!r} is refused"
    cfg = load_config(_minimal(tmp_path, kind), kind=kind)
    written = as_written(cfg)
    filled = [(dotted, spec) for dotted, spec, required in leaves if not required and not _has(written, dotted)]
    assert len(filled) >= 4
    for dotted, spec in filled:
        assert _get(cfg, dotted) == spec.default, dotted
    # a key a config sets keeps its value: only the missing ones are filled
    set_cfg = load_config(_minimal(tmp_path, kind, "runtime = dict(seed=7)\n"), kind=kind)
    assert set_cfg.runtime.seed == 7 and set_cfg.runtime.amp == "auto"


@pytest.mark.parametrize("kind", FILLED_KINDS)
def test_a_required_key_has_no_default_to_fall_back_on(tmp_path, kind):
    """Every leaf without a default is needed: the minimal config without it is refused, naming it."""
    for dotted, spec, required in _leaves(SCHEMAS[kind]):
        if not required:
            continue
        assert spec.default is REQUIRED
        leaf = dotted.rpartition(".")[2]
        path = tmp_path / f"without_{leaf}.py"
        path.write_text(MINIMAL[kind].replace(f"{leaf}=", f"dropped_{leaf}=", 1))
        with pytest.raises(MimbenchError, match=f"`{dotted}` is missing"):
            load_config(path, kind=kind)


@pytest.mark.parametrize("kind", FILLED_KINDS)
def test_a_config_without_runtime_gets_the_schema_defaults(tmp_path, kind):
    cfg = load_config(_minimal(tmp_path, kind), kind=kind)
    runtime = SCHEMAS[kind].keys["runtime"]
    assert "runtime" not in MINIMAL[kind]
    assert dict(cfg.runtime) == {key: spec.default for key, spec in runtime.keys.items()}
    assert set(runtime.keys) >= {"seed", "amp"}
    if kind not in ("knn", "lowshot", "robustness"):  # every training kind shares the whole runtime block
        assert set(runtime.keys) >= set(RUNTIME_KEYS)
        assert (cfg.runtime.log_every, cfg.runtime.ckpt_every, cfg.runtime.progress) == (20, 0, True)


def test_the_hash_covers_what_the_config_says_not_the_filled_defaults(tmp_path):
    path = _minimal(tmp_path, "linear")
    with_kind, without = load_config(path, kind="linear"), load_config(path)
    assert with_kind.runtime.log_every == 20 and "runtime" not in without
    assert config_sha256(with_kind) == config_sha256(without)
    assert as_written(with_kind) == without.to_dict()
    explicit = load_config(path, ["runtime.log_every=20"], kind="linear")  # written out: part of the hash
    assert explicit.runtime.log_every == 20 and config_sha256(explicit) != config_sha256(with_kind)
    # the text a run writes as its config.py loads back with the same hash
    copy = tmp_path / "written.py"
    copy.write_text(written_text(with_kind))
    assert config_sha256(load_config(copy)) == config_sha256(with_kind)
    assert config_sha256(load_config(copy, kind="linear")) == config_sha256(with_kind)


def test_shipped_eval_configs_inherit_the_runtime_and_data_blocks():
    protocol_runtime = dict(seed=0, amp="auto", ckpt_every=10, ckpt_every_steps=0, log_every=20, progress=True,
                            tensorboard=False, trackers=[])
    demo_runtime = {**protocol_runtime, "ckpt_every": 0, "progress": False}
    data = dict(limit_train=None, limit_val=None, max_bad_fraction=0.001)
    for path, kind, runtime, workers in [
        ("eval_configs/linear/mae_vit-b_in1k.py", "linear", protocol_runtime, 10),
        ("eval_configs/linear/mae_vit-l_in1k.py", "linear", protocol_runtime, 10),
        ("eval_configs/finetune/mae_vit-h_in1k.py", "finetune", protocol_runtime, 10),
        ("eval_configs/demo/linear_fmnist.py", "linear", demo_runtime, 0),
        ("eval_configs/demo/finetune_fmnist.py", "finetune", demo_runtime, 0),
        ("eval_configs/knn/dino_k20.py", "knn", dict(seed=0, amp="auto"), 8),
        ("eval_configs/demo/knn_fmnist.py", "knn", dict(seed=0, amp="auto"), 0),
    ]:
        cfg = load_config(path, kind=kind)
        assert dict(cfg.runtime) == runtime, path
        assert dict(cfg.data) == {**data, "num_workers": workers}, path
        text = open(path).read()
        assert "_base_" in text and "ckpt_every" not in text and "num_workers = " not in text, path


def test_allowed_values_are_the_schemas_in_the_modules_and_the_cli():
    assert typing.get_args(cli.Amp) == schema.AMP_CHOICES
    assert fastpath.AMP_CHOICES is schema.AMP_CHOICES
    assert schema.AMP.values is schema.AMP_CHOICES
    assert schema.spec_of("linear", "mode").values is schema.LINEAR_MODES
    assert schema.spec_of("linear", "optim.name").values is linear.LINEAR_OPTIMIZERS is schema.LINEAR_OPTIMIZERS
    assert schema.spec_of("finetune", "augment.mode").values is schema.AUGMENT_MODES
    assert schema.spec_of("finetune", "mixup.mode").values is schema.MIXUP_MODES
    assert schema.spec_of("finetune", "augment.re_mode").values is schema.ERASE_MODES
    assert finetune.HEAD_INIT_STD == schema.spec_of("finetune", "model.head_init_std").default
    result = CliRunner().invoke(cli.app, ["bench", "pretrain", "--amp", "fp8"], terminal_width=200)
    assert result.exit_code == 2
    assert all(repr(choice) in result.output or choice in result.output for choice in schema.AMP_CHOICES)
