"""The task table: a task added in one place has its CLI subcommand, its demo steps and its bench mode."""
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval, tasks


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture
def fake_task(monkeypatch):
    """A task 'fake' whose module records its runner's and its bench step's calls."""
    calls = []

    def run_fake(*, encoder, config, data, out, overrides, resume, colour, layout="auto"):
        calls.append(dict(encoder=encoder, config=config, data=data, out=out, overrides=overrides, colour=colour,
                          layout=layout))
        return {"metrics": {"top1": 12.5}}

    def fake_step(cfg, batch, device, fast, autocast, encoder, arch):
        import torch

        model = torch.nn.Linear(4, 4)
        x = torch.randn(batch, 4)
        calls.append(("bench", batch, fast))
        return model, lambda: model(x).sum().backward(), {"img_size": 4}

    module = types.ModuleType("fake_task_module")
    module.run_fake, module.fake_step = run_fake, fake_step
    monkeypatch.setitem(sys.modules, "fake_task_module", module)
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # the registration below is undone after the test
    tasks.register_task(tasks.Task(
        name="fake", runner="fake_task_module:run_fake", kind="linear", demo_config="demo/linear_fmnist.py",
        protocol_config="linear/mae_vit-b_in1k.py", summary="A fake task.", example="mimbench eval fake --out o",
        options=(tasks.Option("colour", ("--colour",), "red", "Its colour", choices=("red", "blue")),),
        step_options={"colour": "blue"}, bench_mode="fake", bench_step="fake_task_module:fake_step",
        bench_batch="optim.batch_size"))
    return calls


def test_a_registered_task_is_an_eval_subcommand_and_runs_its_runner(fake_task, tmp_path):
    runner = CliRunner()
    listing = _plain(runner.invoke(app, ["eval", "--help"], terminal_width=200).output)
    assert re.search(r"\bfake\b", listing) and "A fake task." in listing
    help_text = _plain(runner.invoke(app, ["eval", "fake", "--help"], terminal_width=200).output)
    assert "--colour" in help_text and "Example: mimbench eval fake" in help_text
    result = runner.invoke(app, ["eval", "fake", "--encoder", "e.safetensors", "--out", str(tmp_path),
                                 "--colour", "blue", "--set", "optim.lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert "fake: top1=12.5" in result.output
    call = fake_task[-1]
    assert call["colour"] == "blue" and call["overrides"] == ["optim.lr=1e-3"] and call["layout"] == "auto"
    assert call["config"].name == "linear_fmnist.py" and call["data"] == tasks.BUILTIN_DATA
    bad = runner.invoke(app, ["eval", "fake", "--encoder", "e", "--out", "o", "--colour", "green"])
    assert bad.exit_code == 2 and "is not one of" in _plain(bad.output)


def test_a_registered_task_is_in_the_demo_and_in_bench(fake_task, tmp_path):
    from mimbench import bench
    from mimbench.demo import QUICK, demo_steps
    from mimbench.steps import Evaluate

    data = {t.name: t.default_data for t in tasks.all_tasks()}
    evaluated = {(s.encoder, s.task) for s in demo_steps(tmp_path, QUICK, data) if isinstance(s, Evaluate)}
    assert {task for _, task in evaluated} == {"knn", "linear", "finetune", "segment", "attentive", "lowshot", "robustness",
                                             "fake"}
    assert ("random-init", "fake") in evaluated
    assert "fake" in bench.modes()
    record = bench.run_bench("fake", steps=1, warmup=0, batch=2, out=tmp_path, device="cpu")
    assert record["protocol"]["mode"] == "fake" and record["metrics"]["img_per_s"] > 0
    assert ("bench", 2, True) in fake_task


def test_run_eval_passes_the_step_options_and_refuses_an_unknown_task(fake_task, tmp_path):
    run_eval("fake", encoder=Path("e"), config=Path("c.py"), data="d", out=tmp_path, colour="red", layout="mae")
    assert fake_task[-1]["layout"] == "mae"
    with pytest.raises(MimbenchError, match="Unknown evaluation task 'nope'"):
        run_eval("nope", encoder=Path("e"), config=Path("c.py"), data="d", out=tmp_path)
    with pytest.raises(MimbenchError, match="already registered"):
        tasks.register_task(tasks.get_task("fake"))
