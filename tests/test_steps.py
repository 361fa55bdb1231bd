"""Pipeline steps side by side: what each step waits for, numbers equal to a run one by one, failures."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimbench.errors import MimbenchError
from mimbench.evals.tasks import TASKS, Task
from mimbench.paths import eval_config, pretrain_config
from mimbench.steps import (Analyze, Build, Control, Evaluate, Pretrain, StepRunner, do_work, plan, timing_rows,
                            write_timings)

MICRO = pretrain_config("mae_micro_fmnist.py")
KNN, LINEAR = eval_config("demo/knn_fmnist.py"), eval_config("demo/linear_fmnist.py")
FEATURES = ("data.limit_train=512", "data.limit_val=200")


@pytest.fixture
def reader_task(monkeypatch):
    """A task that reads the fine-tuned model of its encoder (declared as data: ``after``)."""
    task = Task(name="reads-finetune", runner="mimbench.evals.knn:run_knn", kind="knn", demo_config="x",
                protocol_config="x", summary="", example="", after="finetune")
    monkeypatch.setitem(TASKS, task.name, task)
    return task.name


def test_plan_waits_for_encoders_runs_references_after_and_the_shared_feature_cache(reader_task):
    steps = [Pretrain("mae", MICRO), Pretrain("ddae", MICRO), Control("random-init", config=MICRO),
             Pretrain("vqkd", MICRO, ('model.teacher="{runs}/mae/encoder.safetensors"',)),
             Evaluate("mae", "knn", KNN), Evaluate("mae", "linear", LINEAR), Evaluate("mae", "finetune", KNN),
             Evaluate("mae", reader_task, KNN), Evaluate("ddae", "knn", KNN), Control("like-mae", like="mae"),
             Evaluate("mae", "knn", KNN)]
    assert plan(steps) == [set(), set(), set(), {0}, {0}, {0, 4}, {0}, {0, 6}, {1}, {0}, {0, 4, 5}]
    # a reference encoder's run of the `after` task is waited for too
    referenced = [Pretrain("mae", MICRO), Pretrain("ref", MICRO), Evaluate("mae", "finetune", KNN),
                  Evaluate("ref", "finetune", KNN), Evaluate("mae", reader_task, KNN, reference="ref")]
    assert plan(referenced) == [set(), set(), {0}, {1}, {0, 2, 3}]
    with pytest.raises(MimbenchError, match="output of finetune on ref, which comes after it"):
        plan(referenced[:3] + referenced[4:] + referenced[3:4])
    # encoders made before the first step are waited for by nobody; unknown ones are refused before any work
    assert plan([Evaluate("old", "knn", KNN)], made=["old"]) == [set()]
    with pytest.raises(MimbenchError, match="no earlier step made"):
        plan([Evaluate("mae", "knn", KNN), Pretrain("mae", MICRO)])
    with pytest.raises(MimbenchError, match="no earlier step made"):
        plan([Control("c", like="mae")])
    # a task listed in `after` that comes later in the list is refused, one by one as side by side
    late = [Pretrain("mae", MICRO), Evaluate("mae", reader_task, KNN), Evaluate("mae", "finetune", KNN)]
    with pytest.raises(MimbenchError, match="comes after it"):
        plan(late)
    with pytest.raises(MimbenchError, match="comes after it"):
        StepRunner(Path("unused"), log=lambda text: None).run(late, jobs=2)


def test_plan_an_evaluation_waits_for_the_build_of_its_data_and_an_analysis_for_its_encoder(tmp_path):
    seg = Build("segment", "mimbench.data.seg:build_fashion_mnist_seg", tmp_path / "seg", (("n_train", 8),))
    steps = [Pretrain("mae", MICRO), seg, Evaluate("mae", "segment", KNN, data=str(tmp_path / "seg")),
             Evaluate("mae", "knn", KNN), Analyze("mae"), Control("random-init", config=MICRO), Analyze("random-init")]
    assert plan(steps) == [set(), set(), {0, 1}, {0}, {0}, set(), {5}]
    with pytest.raises(MimbenchError, match="reads data .* which a later step builds"):
        plan([Pretrain("mae", MICRO), steps[2], seg])
    with pytest.raises(MimbenchError, match="no earlier step made"):
        plan([Analyze("mae"), Pretrain("mae", MICRO)])


def test_a_build_step_builds_its_data_once_and_is_reused_when_it_writes_nothing(tmp_path):
    from mimbench.steps import Work

    root = tmp_path / "seg"
    step = Build("segment", "mimbench.data.seg:build_fashion_mnist_seg", root, (("n_train", 6), ("n_val", 2)))
    first = do_work(Work(step, root))
    assert not first.reused and first.path == root and len(list((root / "images" / "training").iterdir())) == 6
    assert do_work(Work(step, root)).reused  # the set is there: nothing written
    other = Build("segment", step.builder, root, (("n_train", 4), ("n_val", 2)))
    assert not do_work(Work(other, root)).reused  # other parameters: built again
    assert len(list((root / "images" / "training").iterdir())) == 4


def _metrics(root: Path) -> dict:
    records = {}
    for path in sorted((root / "evals").rglob("*.json")):
        record = json.loads(path.read_text())
        if "run_id" in record:
            records[(record["task"], path.parent.parent.name)] = record["metrics"]
    return records


def test_side_by_side_gives_the_numbers_of_one_by_one(tmp_path):
    """Every step seeds itself and runs with the pipeline's one thread: two workers and one process (started with 2
    threads, which the runner sets to 1 for each step and restores after) agree bit for bit, pre-training included;
    each step worked in a worker has its console.log and its time."""
    steps = [Pretrain("mae", MICRO, ("data.limit=256", "schedule.epochs=1", "schedule.warmup_epochs=0.5")),
             Control("random-init", config=MICRO, seed=3)]
    for name in ("mae", "random-init"):
        steps += [Evaluate(name, "knn", KNN, FEATURES),
                  Evaluate(name, "linear", LINEAR, (*FEATURES, "schedule.epochs=2", "schedule.warmup_epochs=1"))]
    one = StepRunner(tmp_path / "one", log=lambda text: None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one.run(steps)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    lines = []
    two = StepRunner(tmp_path / "two", log=lines.append)
    outcomes = two.run(steps, jobs=2)
    assert [o.step.title for o in outcomes] == [s.title for s in steps] and not any(o.reused for o in outcomes)
    assert _metrics(tmp_path / "one") == _metrics(tmp_path / "two") and len(_metrics(tmp_path / "two")) == 4
    for name in ("mae", "random-init"):
        a, b = (load_file(str(root / "encoders" / name / "encoder.safetensors")) for root in (one.root, two.root))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(o.log is not None and o.log.is_file() and o.seconds > 0 for o in outcomes)
    assert "epoch" in (two.encoders_root / "mae" / "console.log").read_text().lower()
    assert sum(" done in " in line for line in lines) == len(steps)
    rows = timing_rows(outcomes)
    assert [r["status"] for r in rows] == ["ran"] * len(steps)
    text = write_timings(outcomes, tmp_path / "steps.csv").read_text().splitlines()
    assert text[0] == "step,status,seconds,log" and len(text) == len(steps) + 1
    # a second run side by side reuses every step, in the same order
    again = StepRunner(tmp_path / "two", log=lambda text: None).run(steps, jobs=2, threads=1)
    assert all(o.reused for o in again) and [o.step for o in again] == [o.step for o in outcomes]


def test_a_failing_step_side_by_side_stops_what_waits_for_it_and_keeps_what_finished(tmp_path):
    steps = [Control("a", config=MICRO), Control("b", config=MICRO, seed=1),
             Evaluate("a", "knn", KNN, FEATURES, data=str(tmp_path / "no-such-folder")),
             Evaluate("a", "linear", LINEAR, FEATURES)]  # shares the k-NN's feature cache: waits for it
    lines = []
    runner = StepRunner(tmp_path / "run", log=lines.append)
    with pytest.raises(MimbenchError) as failed:
        runner.run(steps, jobs=2, threads=1)
    # the user's error crosses the process boundary whole: what was wrong, and what to do
    assert "no-such-folder" in failed.value.problem and failed.value.fix
    assert {o.step.name for o in runner.outcomes} == {"a", "b"}
    assert runner.encoder_path("b").is_file() and not runner.eval_dir("a", "linear").exists()
    log = runner.eval_dir("a", "knn") / "console.log"
    assert "Traceback" in log.read_text() and any("knn on a failed" in line for line in lines)
    # as one by one: a rerun reuses what finished and redoes the failed step
    lines.clear()
    with pytest.raises(MimbenchError):
        StepRunner(tmp_path / "run", log=lines.append).run(steps, jobs=2, threads=1)
    assert sum(line.startswith("reusing") for line in lines) == 2
    assert sum(line.startswith("redoing") for line in lines) == 1


def test_low_shot_keeps_the_torch_thread_count_of_its_process(monkeypatch):
    """cyanure's default (every core) reset OpenMP's thread count, which torch shares: a worker's later bf16 steps
    then ran on more threads than it was given and went non-finite at their first step."""
    pytest.importorskip("cyanure")
    import numpy as np

    from mimbench.evals import lowshot
    from mimbench.steps import usable_cores

    if usable_cores() < 2:
        pytest.skip("one core: every thread count is 1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as in a shell: cyanure's default reads it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lowshot.fit_logreg(lowshot.centre_normalise(np.random.default_rng(0).normal(size=(30, 4))),
                           np.arange(30) % 3, lambd=0.1, tol=1e-3, max_iter=20)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_jobs_is_one_step_per_usable_core(monkeypatch):
    from mimbench import steps

    monkeypatch.setattr(steps.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert steps.default_jobs() == 3 // steps.STEP_THREADS
    monkeypatch.setattr(steps.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert steps.default_jobs() == 1
