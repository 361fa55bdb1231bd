"""The command line: every command documented with an example; user errors exit 2 with a readable message."""
import re

import pytest
from typer.testing import CliRunner

from mimbench.cli import app

runner = CliRunner()

COMMANDS = ["info", "pretrain", "demo", "report", "leaderboard", "compare", "convert", "reproduce", "bench", "eval"]
EVAL_COMMANDS = ["linear", "finetune", "knn", "segment"]


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
