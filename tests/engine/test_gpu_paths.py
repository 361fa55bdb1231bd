"""The GPU paths of the loop, shown on the CPU with CUDA queries monkeypatched: device choice under per-task
GPU binding, one process in a multi-task allocation, precision and TF32 by compute capability, DDP before
torch.compile, and validation under the autocast the record states."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from mimbench import dist, engine, env, fastpath
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parents[2]
SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "WORLD_SIZE", "RANK",
              "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available' with a settable number of GPUs and compute capability; TF32 switches restored after."""
    gpu = {"count": 1, "capability": (8, 0), "current": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpu["count"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: gpu["current"].append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu["capability"] >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "fake GPU")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield gpu
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the code under test exports is removed again afterwards."""
    for name in (*SLURM_VARS, "MIMBENCH_TF32"):
        monkeypatch.setenv(name, "")  # recorded, so that the teardown restores the variable's absence
        monkeypatch.delenv(name)
    return monkeypatch


# ---------------------------------------------------------------------------- item 3: device and launcher
def test_a_task_bound_to_one_gpu_uses_it_whatever_its_local_rank(fake_cuda):
    fake_cuda["count"] = 1
    assert dist.choose_device(3) == torch.device("cuda", 0)
    fake_cuda["count"] = 8
    assert dist.choose_device(3) == torch.device("cuda", 3)
    fake_cuda["count"] = 2
    with pytest.raises(MimbenchError, match="Local rank 3 has no GPU: this process sees 2 GPUs"):
        dist.choose_device(3)


def test_srun_with_gpus_per_task_sets_up_rank_3_on_its_one_gpu(fake_cuda, clean_env):
    """srun --gpus-per-task=1, task 3 of 8: the process group forms (NCCL) on cuda:0 instead of stopping with
    'Local rank 3 has no GPU'."""
    calls = []
    for name, value in dict(SLURM_PROCID="3", SLURM_LOCALID="3", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8",
                            MASTER_ADDR="127.0.0.1").items():
        clean_env.setenv(name, value)
    clean_env.setattr(dist, "_CONTEXT", None)
    clean_env.setattr(tdist, "init_process_group", lambda **kw: calls.append(kw))
    clean_env.setattr(sys, "stdout", sys.stdout)  # a non-zero rank discards its stdout
    with warnings.catch_warnings():
        ctx = dist.setup()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher) == (3, 8, 3, "slurm")
    assert ctx.device == torch.device("cuda", 0) and fake_cuda["current"] == [torch.device("cuda", 0)]
    assert [(c["backend"], c["rank"], c["world_size"]) for c in calls] == [("nccl", 3, 8)]


@pytest.mark.parametrize("step_tasks", [None, "1"])
def test_the_batch_script_of_a_multi_task_allocation_is_one_process(clean_env, step_tasks):
    """sbatch --ntasks=8 runs the script once (SLURM_NTASKS=8, SLURM_PROCID=0): not srun's task 0 of 8."""
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_LOCALID", "0")
    if step_tasks is not None:
        clean_env.setenv("SLURM_STEP_NUM_TASKS", step_tasks)
    assert dist.dist_info() == (0, 1, 0, "none")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "8")  # a task srun started
    assert dist.dist_info() == (0, 8, 0, "slurm")


# ---------------------------------------------------------------------------- item 7a/b: precision and TF32
@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpu_capability(fake_cuda, capability, expected):
    fake_cuda["capability"] = capability
    assert fastpath.choose_precision("auto", "cuda") == expected
    assert fastpath.choose_precision("bf16", "cuda") == "bf16" and fastpath.choose_precision("none", "cuda") == "none"
    _, scaler = engine._autocast("auto", torch.device("cuda"))
    assert (scaler is not None) == (expected == "fp16")  # fp16 trains with a grad scaler


@pytest.mark.parametrize("forced, expected", [("1", "bf16"), ("0", "none")])
def test_auto_precision_on_the_cpu_keeps_the_native_bf16_rule(monkeypatch, forced, expected):
    monkeypatch.setenv("MIMBENCH_CPU_BF16", forced)
    assert fastpath.choose_precision("auto", "cpu") == expected


@pytest.mark.parametrize("capability, setting, expected", [((8, 0), None, True), ((8, 6), "0", False),
                                                           ((7, 0), None, False)])
def test_tf32_is_an_explicit_choice_and_recorded(fake_cuda, clean_env, capability, setting, expected):
    fake_cuda["capability"] = capability
    if setting is not None:
        clean_env.setenv("MIMBENCH_TF32", setting)
    torch.backends.cuda.matmul.allow_tf32 = not expected
    assert fastpath.configure_tf32("cuda") is expected
    assert torch.backends.cuda.matmul.allow_tf32 is expected and torch.backends.cudnn.allow_tf32 is expected
    assert fastpath.tf32_enabled() is expected and env.precision_support()["tf32_enabled"] is expected


def test_tf32_is_off_on_the_cpu():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert fastpath.configure_tf32("cpu") is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------- item 7c: DDP, then compile
@pytest.fixture
def compiled(monkeypatch):
    """Record which modules ``Module.compile`` is called on (without compiling)."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: seen.append(type(self).__name__))
    return seen


def test_compile_wraps_the_ddp_wrapper(tmp_path, compiled):
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = dist.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), launcher="pytorch")
        wrapped = engine.wrap_for_training(torch.nn.Linear(4, 2), ctx, compile=True)
        assert type(wrapped).__name__ == "DistributedDataParallel" and compiled == ["DistributedDataParallel"]
    finally:
        tdist.destroy_process_group()
    assert engine.wrap_for_training(torch.nn.Linear(4, 2), dist.context(), compile=False).__class__ is torch.nn.Linear


def test_the_loop_compiles_when_asked(tmp_path, compiled):
    model = torch.nn.Linear(4, 2)
    loader = [(torch.randn(3, 4),)] * 2

    def step(m, batch):
        return m(batch[0]).pow(2).mean(), {}

    for flag in (False, True):
        engine.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, step,
                   engine.LoopConfig(epochs=1, warmup_epochs=0, progress=False, compile=flag), tmp_path / str(flag))
    assert compiled == ["Linear"]


# ---------------------------------------------------------------------------- item 7e: validation precision
def _autocast_now():
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_linear_validation_runs_under_the_recorded_precision(tiny_encoder, tmp_path, monkeypatch):
    from mimbench.evals import linear, run_eval

    monkeypatch.setenv("MIMBENCH_CPU_BF16", "1")
    seen, real = [], linear.probe_logits
    monkeypatch.setattr(linear, "probe_logits",
                        lambda head, enc, x: seen.append((head.training, _autocast_now())) or real(head, enc, x))
    record = run_eval("linear", encoder=tiny_encoder, config=REPO / "eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=64", "data.limit_val=32", "schedule.epochs=2",
                                 "schedule.warmup_epochs=1", "optim.batch_size=32", "runtime.progress=False"])
    validation = [dtype for training, dtype in seen if not training]
    assert record["hardware"]["precision"] == "bf16"
    assert validation and set(validation) == {torch.bfloat16}


def test_finetune_validation_runs_under_the_recorded_precision(tiny_encoder, tmp_path, monkeypatch):
    from mimbench.evals import finetune, run_eval

    monkeypatch.setenv("MIMBENCH_CPU_BF16", "1")
    seen, real = [], finetune.build_model

    def build(*a, **k):
        model = real(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.append((m.training, _autocast_now())))
        return model

    monkeypatch.setattr(finetune, "build_model", build)
    record = run_eval("finetune", encoder=tiny_encoder, config=REPO / "eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=32", "data.limit_val=16", "optim.batch_size=16",
                                 "schedule.epochs=2", "schedule.warmup_epochs=1", "runtime.progress=False"])
    validation = [dtype for training, dtype in seen if not training]
    assert record["hardware"]["precision"] == "bf16"
    assert validation and set(validation) == {torch.bfloat16}
