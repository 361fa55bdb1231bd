"""The command line: every command documented with an example; user errors exit 2 with a readable message."""
import re

import pytest
from typer.testing import CliRunner

from mimbench.cli import app

runner = CliRunner()

COMMANDS = ["info", "pretrain", "demo", "report", "leaderboard", "compare", "convert", "reproduce", "bench", "eval",
            "control"]
EVAL_COMMANDS = ["knn", "linear", "attentive", "finetune", "segment", "lowshot", "robustness"]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_every_command_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    out = _plain(result.output)
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", out), f"{name} missing from mimbench --help"


@pytest.mark.parametrize("argv", [[c, "--help"] for c in COMMANDS if c != "eval"]
                         + [["eval", c, "--help"] for c in EVAL_COMMANDS])
def test_every_command_has_help_with_an_example(argv):
    result = runner.invoke(app, argv, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: mimbench" in _plain(result.output)


def test_user_error_is_one_paragraph_and_exit_code_2(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "missing.safetensors" in _plain(result.output)


def test_unknown_override_key_is_refused_before_work(tmp_path):
    from mimbench.config import load_config
    from mimbench.errors import MimbenchError

    cfg = tmp_path / "c.py"
    cfg.write_text("optim = dict(lr=0.1)\n")
    assert load_config(cfg, ["optim.lr=0.5"]).optim.lr == 0.5
    with pytest.raises(MimbenchError, match="optim.lrr"):
        load_config(cfg, ["optim.lrr=0.5"])
    with pytest.raises(MimbenchError, match="key=value"):
        load_config(cfg, ["optim.lr"])


@pytest.mark.parametrize("raw,value", [("false", False), ("False", False), ("TRUE", True), ("true", True),
                                       ("null", None), ("NULL", None), ("None", None), ("1e-3", 1e-3), ("3", 3),
                                       ("none", "none"),  # a knob value (target_norm='none'), not the default
                                       ("[1, 2]", [1, 2]), ("'x'", "x"), ("adamw", "adamw"), (" 0.5 ", 0.5)])
def test_set_values_read_like_mmengine(raw, value):
    from mimbench.config import parse_override

    key, got = parse_override(f"a.b={raw}")
    assert key == "a.b" and got == value and type(got) is type(value)


def test_set_false_reaches_the_config_as_a_bool(tmp_path):
    from mimbench.config import load_config

    cfg = tmp_path / "c.py"
    cfg.write_text("progress = True\ncache_dir = 'x'\n")
    loaded = load_config(cfg, ["progress=false", "cache_dir=null"])
    assert loaded.progress is False and loaded.cache_dir is None


@pytest.mark.parametrize("argv,option", [
    (["report", ".", "--format", "docx"], "--format"),
    (["reproduce", "beit"], "PAPER"),
    (["reproduce", "ddae", "--scale", "huge"], "--scale"),
    (["leaderboard", "--task", "segmentation"], "--task"),
    (["convert", "a.pth", "b.safetensors", "--layout", "caffe"], "--layout"),
    (["bench", "backward"], "WHAT"),
    (["eval", "segment", "--encoder", "e.safetensors", "--out", "o", "--launcher", "mpi"], "--launcher"),
])
def test_bad_choice_is_refused_with_the_list(argv, option):
    result = runner.invoke(app, argv, terminal_width=200)
    out = _plain(result.output)
    assert result.exit_code == 2, out
    assert "Invalid value" in out and option.lower() in out.lower() and "is not one of" in out


def test_cli_choices_are_the_constants_of_the_modules_that_implement_them():
    import typing

    from mimbench import bench, cli, reproduce, schema
    from mimbench.encoders import convert
    from mimbench.evals import tasks
    from mimbench.results import leaderboard, report

    assert typing.get_args(cli.ReportFormat) == report.FORMATS
    assert typing.get_args(cli.LeaderboardTask) == tuple(leaderboard.TASK_METRIC)
    assert typing.get_args(cli.Paper) == reproduce.PAPERS
    assert typing.get_args(cli.Scale) == reproduce.SCALES
    assert typing.get_args(cli.Amp) == schema.AMP.values
    assert cli.LAYOUTS.values == convert.LAYOUTS and cli.BENCH_MODES.values == bench.modes()
    launcher = next(o for o in tasks.get_task("segment").options if o.name == "launcher")
    assert launcher.choices is tasks.LAUNCHERS


def test_every_eval_subcommand_states_a_default_config_of_the_same_kind():
    from mimbench.evals.tasks import all_tasks
    from mimbench.paths import EVAL_CONFIGS, REPO_ROOT

    assert [t.name for t in all_tasks()] == EVAL_COMMANDS
    for task in all_tasks():
        default, protocol = str(EVAL_CONFIGS / task.demo_config), str(EVAL_CONFIGS / task.protocol_config)
        assert (REPO_ROOT / default).is_file() and (REPO_ROOT / protocol).is_file()
        assert "demo" in default and "fmnist" in default  # all four: the built-in data's demo configs
        out = " ".join(_plain(runner.invoke(app, ["eval", task.name, "--help"], env={"COLUMNS": "400"}).output).split())
        assert default in out and protocol in out, task.name


def test_shell_completion_is_offered():
    out = _plain(runner.invoke(app, ["--help"], terminal_width=200).output)
    assert "--install-completion" in out and "--show-completion" in out
