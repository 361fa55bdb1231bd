"""scripts/gpu_check.sh: valid bash, and every command it runs names options the CLI has and config keys that load."""
import os
import shlex
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.config import load_config
from mimbench.evals.tasks import all_tasks
from mimbench.paths import eval_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _commands(tmp_path) -> list[list[str]]:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "gc")], capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1"}, cwd=SCRIPT.parents[1]).stdout
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _cli_args(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("mimbench.cli") + 1:]


def _overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_the_script_covers_every_path(tmp_path):
    cmds = _commands(tmp_path)
    subs = [" ".join(_cli_args(c)[:2]) for c in cmds]
    for wanted in ("eval linear", "eval finetune", "eval knn", "eval segment", "eval attentive", "eval lowshot"):
        assert wanted in subs
    pretrain = next(c for c in cmds if _cli_args(c)[0] == "pretrain")
    assert {"runtime.amp=bf16", "runtime.compile=True"} <= set(_overrides(pretrain))
    assert any(c[0] == "torchrun" and "--nproc_per_node=1" in c for c in cmds)
    assert any("--suite" in c for c in cmds) and any("calibrate" in c for c in cmds)


def test_every_option_exists_and_every_override_loads(tmp_path):
    tasks = {t.name: t for t in all_tasks()}
    for cmd in _commands(tmp_path):
        args = _cli_args(cmd)
        sub = args[:2] if args[0] == "eval" else args[:1]
        help_text = CliRunner().invoke(app, [*sub, "--help"], terminal_width=200).output
        for token in args:
            if token.startswith("--"):
                assert token in help_text, (sub, token)
        overrides = _overrides(args)
        if args[0] == "pretrain":
            load_config(args[args.index("--config") + 1], overrides, kind="pretrain")
        elif args[0] == "eval":
            task = tasks[args[1]]
            load_config(eval_config(task.demo_config), overrides, kind=task.kind)
