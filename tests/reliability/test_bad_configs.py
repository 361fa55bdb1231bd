"""Bad configs - unknown keys, wrong types, out-of-range values, in files and in --set - are refused before
any work starts, naming the key, the value and what is allowed; property-based tests of the override
parser, the formatter that writes overrides back, and the schema check."""
import copy
import functools
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mimbench.config import format_override, format_value, load_config, parse_override
from mimbench.errors import MimbenchError
from mimbench.schema import KINDS, SCHEMAS, Section, knows_key, validate

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "pretrain": REPO / "pretrain/configs/mae_micro_fmnist.py",
    "linear": REPO / "eval_configs/demo/linear_fmnist.py",
    "finetune": REPO / "eval_configs/demo/finetune_fmnist.py",
    "knn": REPO / "eval_configs/demo/knn_fmnist.py",
    "lowshot": REPO / "eval_configs/demo/lowshot_fmnist.py",
    "segment": REPO / "eval_configs/segmentation/demo_fmnist_seg.py",
    "attentive": REPO / "eval_configs/demo/attentive_fmnist.py",
    "robustness": REPO / "eval_configs/demo/robustness_fmnist.py",
}
# (kind, config-file line or --set override, words the error must contain)
BAD = [
    ("pretrain", "runtime = dict(ckpt_every_step=5)", ["runtime.ckpt_every_step", "did you mean `runtime.ckpt_every_steps`"]),
    ("pretrain", "optim = dict(blr='1.5e-4')", ["optim.blr", "'1.5e-4'", "is a str", "a number > 0"]),
    ("pretrain", "runtime = dict(mask_ratio=1.0)", ["runtime.mask_ratio", "1.0", "out of range", "(0, 1)"]),
    ("pretrain", "schedule = dict(epochs=2, warmup_epochs=2)", ["warmup_epochs must be below"]),
    ("linear", "optim = dict(nmae='adam')", ["optim.nmae", "did you mean `optim.name`"]),
    ("linear", "mode = 'protocl'", ["mode", "'protocl'", "one of 'protocol', 'cached'"]),
    ("linear", "schedule = dict(epochs=0)", ["schedule.epochs", "= 0", "an integer >= 1"]),
    ("linear", "data = dict(max_bad_fraction=1.5)", ["data.max_bad_fraction", "1.5", "[0, 1]"]),
    ("finetune", "mixup = dict(smoothing=1.0)", ["mixup.smoothing", "[0, 1)"]),
    ("finetune", "optim = dict(layer_decay=0)", ["optim.layer_decay", "= 0", "(0, 1]"]),
    ("finetune", "runtime = dict(progres=False)",
     ["unknown key `runtime.progres`", "did you mean `runtime.progress`"]),
    ("finetune", "runtime = dict(ckpt_every_steps=True)", ["ckpt_every_steps", "True", "is a bool", "an integer >= 0"]),
    ("knn", "knn = dict(k=20.5)", ["knn.k", "20.5", "is a float"]),
    ("knn", "knn = dict(temperature=-0.07)", ["knn.temperature", "a number > 0"]),
    ("segment", "crop_size = (32, 32, 3)", ["crop_size", "has 3 items"]),
    ("segment", "train_dataloader = dict(batch_size=0)", ["train_dataloader.batch_size", "an integer >= 1"]),
    ("segment", "default_hooks = dict(checkpoint=dict(interval='250'))", ["default_hooks.checkpoint.interval", "is a str"]),
    ("attentive", "head = dict(preset='cea')", ["head.preset", "'cea'", "one of 'cae', 'ep', 'vjepa'"]),
    ("attentive", "optim = dict(name='sdg')", ["optim.name", "'sdg'", "one of 'sgd', 'lars', 'adamw'"]),
    ("attentive", "head = dict(tokens='patches')", ["head.tokens", "one of 'all', 'patch'"]),
]


def _bad_file(tmp_path, kind, line):
    path = tmp_path / f"bad_{kind}.py"
    path.write_text(f"_base_ = [{str(BASE[kind])!r}]\n{line}\n")
    return path


def _as_override(line):
    """'optim = dict(blr=1)' -> 'optim.blr=1'; 'mode = 1' -> 'mode=1' (one leaf per line above)."""
    key, value = (s.strip() for s in line.split("=", 1))
    while value.startswith("dict("):
        inner, value = value[5:-1].split("=", 1)
        key += "." + inner.strip()
    return f"{key}={value}"


@pytest.mark.parametrize("kind, line, words", BAD, ids=[f"{k}:{l}" for k, l, _ in BAD])
def test_bad_config_file_is_refused_naming_key_value_and_allowed(tmp_path, kind, line, words):
    with pytest.raises(MimbenchError) as err:
        load_config(_bad_file(tmp_path, kind, line), kind=kind)
    text = str(err.value)
    for w in words:
        assert w in text, (w, text)
    if "must be below" not in text:
        assert f"bad_{kind}.py" in text  # where the value came from


@pytest.mark.parametrize("kind, line, words", [b for b in BAD if "schedule = dict(epochs=2," not in b[1]],
                         ids=[f"{k}:{l}" for k, l, _ in BAD if "schedule = dict(epochs=2," not in l])
def test_bad_override_is_refused_the_same_way(kind, line, words):
    override = _as_override(line)
    with pytest.raises(MimbenchError) as err:
        load_config(BASE[kind], [override], kind=kind)
    text = str(err.value)
    if "do not exist" in text:  # unknown keys are refused before merging, naming the key
        assert override.split("=")[0] in text
        return
    assert "(--set)" in text
    for w in words:
        assert w in text, (w, text)


def test_every_shipped_config_passes_its_schema():
    kinds = {"pretrain/configs": "pretrain", "eval_configs/reproduce": "pretrain", "eval_configs/linear": "linear",
             "eval_configs/finetune": "finetune", "eval_configs/knn": "knn", "eval_configs/segmentation": "segment",
             "eval_configs/lowshot": "lowshot",
             "eval_configs/attentive": "attentive", "eval_configs/robustness": "robustness"}
    n = 0
    for folder, kind in kinds.items():
        for path in sorted((REPO / folder).glob("*.py")):
            load_config(path, kind=kind)
            n += 1
    for path in sorted((REPO / "eval_configs/demo").glob("*.py")):
        load_config(path, kind=next(k for k in ("linear", "finetune", "knn", "lowshot", "attentive", "robustness")
                                       if k in path.name))
        n += 1
    assert n >= 25


def test_override_may_set_a_key_the_schema_knows_but_the_file_omits():
    cfg = load_config(BASE["knn"], ["knn.k=5"], kind="knn")
    assert cfg.knn.k == 5
    assert knows_key("pretrain", "model.any_constructor_argument")  # open section: the model refuses typos itself
    assert not knows_key("linear", "optim.lrr")


def _sample_out(tmp_path):
    out = tmp_path / "out"
    assert not out.exists()
    return out


@pytest.mark.parametrize("kind", ["pretrain", "linear", "finetune", "knn", "segment"])
def test_bad_config_stops_every_command_before_any_work(tmp_path, kind):
    from functools import partial

    from mimbench.testing import write_tiny_encoder

    enc = write_tiny_encoder(tmp_path / "enc.safetensors")
    out = _sample_out(tmp_path)
    line = {"pretrain": "runtime = dict(seeed=1)", "linear": "optim = dict(bs=1)",
            "finetune": "runtime = dict(amp='fp8')",
            "knn": "knn = dict(k=0)", "segment": "crop_size = (32, -32)"}[kind]
    bad = _bad_file(tmp_path, kind, line)
    if kind == "pretrain":
        from pretrain.main import run_pretrain
        call = partial(run_pretrain, bad, out=out)
    else:
        import importlib

        module = importlib.import_module(f"mimbench.evals.{kind}")
        data = "builtin:fashion-mnist-seg" if kind == "segment" else "builtin:fashion-mnist"
        call = partial(getattr(module, f"run_{kind}"), encoder=enc, config=bad, data=data, out=out)
    with pytest.raises(MimbenchError, match="config is not valid"):
        call()
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------- properties
KEY = st.lists(st.text(string.ascii_letters + "_", min_size=1, max_size=8), min_size=1, max_size=4).map(".".join)
SCALAR = (st.none() | st.booleans() | st.integers(-10**30, 10**30)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)


def _normalise(v):
    """Tuples come back as lists."""
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalise(x) for k, x in v.items()}
    return v


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(KEY, VALUE)
def test_format_then_parse_gives_back_key_and_value(key, value):
    k, v = parse_override(format_override(key, value))
    assert k == key
    assert _same(v, _normalise(value)), (format_value(value), v)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_override_accepts_or_refuses_clearly_any_text(text):
    try:
        key, value = parse_override(text)
    except MimbenchError as err:
        assert err.fix
        return
    assert "=" in text and key == text.split("=", 1)[0].strip() and key


def _leaves(section, prefix=""):
    for name, spec in section.keys.items():
        if isinstance(spec, Section):
            yield from _leaves(spec, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", spec


@functools.lru_cache(maxsize=None)
def _loaded(kind):
    return load_config(BASE[kind], kind=kind).to_dict()


LEAVES = [(kind, key, spec) for kind in KINDS for key, spec in _leaves(SCHEMAS[kind])]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LEAVES), VALUE)
def test_schema_accepts_exactly_the_allowed_values_and_names_the_rest(leaf, value):
    kind, key, spec = leaf
    cfg = copy.deepcopy(_loaded(kind))
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    ok = spec.problem(value) is None
    try:
        validate(cfg, kind, source="cfg.py", overridden={key: value})
    except MimbenchError as err:
        # a value the leaf accepts can still break a rule across keys (warmup below epochs, lr or blr set)
        assert not ok or "must be below" in str(err) or "needs lr or blr" in str(err) or "is missing" in str(err)
        if not ok:
            assert f"`{key}` = {value!r} (--set)" in str(err) and spec.allowed() in str(err)
        return
    assert ok, f"{key}={value!r} passed but the leaf refuses it"
