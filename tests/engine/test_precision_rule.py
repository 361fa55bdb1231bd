"""amp="auto" is a rule of the CPU's kind and the workload (mimbench.fastpath), and bench --amp calibrate times it."""
import pytest
import torch

from mimbench import fastpath
from mimbench.bench import format_bench, run_bench
from mimbench.fastpath import Workload, cpu_kind, precision_choice
from mimbench.results.records import validate_record

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})
MICRO_STEP = Workload(64, 4, 17, True)  # the demo's micro MAE: 64-d x 4, 16 visible patches + class token
TINY_STEP = Workload(192, 6, 17, True)
VITB_FEATURES = Workload(768, 12, 197, False)
VITB_STEP = Workload(768, 12, 50, True)  # MAE ViT-B/16 pre-training at 224: 49 visible patches + class token
VITL_FEATURES = Workload(1024, 24, 197, False)
TINY_FMNIST_STEP = Workload(128, 6, 17, True)  # pretrain/configs/mae_tiny_fmnist.py
MICRO_FINETUNE = Workload(64, 4, 65, True)  # the demo's micro encoder fine-tuned: 64 patches + class token
MICRO_FEATURES = Workload(64, 4, 65, False)
NANO_FEATURES = Workload(32, 2, 17, False)  # the tests' tiny_vit


@pytest.fixture
def cpu(monkeypatch):
    """Fake the CPU's /proc/cpuinfo flags (and drop the MIMBENCH_CPU_BF16 pin of conftest)."""
    monkeypatch.delenv("MIMBENCH_CPU_BF16", raising=False)
    monkeypatch.setattr(fastpath.platform, "system", lambda: "Linux")

    def use(flags):
        monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset(flags))
    return use


def test_cpu_kinds_from_flags(monkeypatch):
    monkeypatch.setattr(fastpath.platform, "system", lambda: "Linux")
    assert cpu_kind(AMX) == "amx" and cpu_kind(AVX512_BF16) == "avx512_bf16" and cpu_kind(AVX2) == "no_bf16"
    assert cpu_kind({"asimd", "bf16"}) == "arm_bf16"


@pytest.mark.parametrize("flags, workload, expected", [
    # AVX2 only: bf16 is emulated (14x slower), fp32 for every size
    (AVX2, MICRO_STEP, "none"), (AVX2, TINY_STEP, "none"), (AVX2, VITB_FEATURES, "none"), (AVX2, VITL_FEATURES, "none"),
    # AMD AVX-512-BF16: tiny step 1.33x in bf16 (the threshold), ViT-B features 2.95x; micro below: fp32
    (AVX512_BF16, MICRO_STEP, "none"), (AVX512_BF16, TINY_STEP, "bf16"), (AVX512_BF16, VITB_FEATURES, "bf16"),
    (AVX512_BF16, VITB_STEP, "bf16"),
    # Intel AMX (bf16 with explicit attention): training micro 0.88x -> fp32, mae_tiny_fmnist 1.42-1.61x and
    # larger -> bf16; inference 32-d x 2 0.91x -> fp32, 32-d x 4 at 65 tokens 1.10x and larger -> bf16
    (AMX, MICRO_STEP, "none"), (AMX, TINY_FMNIST_STEP, "bf16"), (AMX, TINY_STEP, "bf16"),
    (AMX, MICRO_FINETUNE, "bf16"), (AMX, NANO_FEATURES, "none"), (AMX, MICRO_FEATURES, "bf16"),
    (AMX, VITB_FEATURES, "bf16"), (AMX, VITB_STEP, "bf16"), (AMX, VITL_FEATURES, "bf16"),
])
def test_auto_on_each_cpu_kind_and_size(cpu, flags, workload, expected):
    cpu(flags)
    choice = precision_choice("auto", "cpu", workload)
    assert choice.precision == expected
    assert cpu_kind() in choice.reason or "without bf16" in choice.reason
    assert fastpath.choose_precision("auto", "cpu", workload) == expected
    assert precision_choice("bf16", "cpu", workload).precision == "bf16"  # an explicit setting is taken as given
    assert precision_choice("none", "cpu", workload).precision == "none"


def test_thresholds_sit_between_the_measurements():
    assert fastpath.AVX512_BF16_MIN_WORK == TINY_STEP.work == 192 ** 2 * 6 * 17
    assert MICRO_STEP.work < fastpath.AMX_TRAIN_MIN_WORK < TINY_FMNIST_STEP.work
    assert fastpath.AMX_TRAIN_MIN_WORK ** 2 == pytest.approx(MICRO_STEP.work * TINY_FMNIST_STEP.work, rel=1e-4)
    assert NANO_FEATURES.work < fastpath.AMX_INFERENCE_MIN_WORK < Workload(32, 4, 65, False).work
    assert fastpath.AMX_INFERENCE_MIN_WORK ** 2 == pytest.approx(NANO_FEATURES.work * 32 ** 2 * 4 * 65, rel=1e-4)
    assert TINY_STEP.work < fastpath.ARM_BF16_MIN_WORK < VITB_FEATURES.work


def test_attention_is_explicit_under_cpu_bf16_only(cpu):
    """torch's fused CPU attention is slow in bf16 (the tiny MAE step 381 against 1,030 img/s explicit on AMX):
    the fast path runs timm's explicit path there, the fused kernel everywhere else, and the reason says so."""
    from mimbench.testing import tiny_vit

    assert fastpath.attention_fused("none", "cpu") and fastpath.attention_fused("bf16", "cuda")
    assert fastpath.attention_fused("fp16", "cuda") and not fastpath.attention_fused("bf16", "cpu")
    vit = tiny_vit()
    assert fastpath.match_attention(vit, "bf16", "cpu") is False
    assert not any(b.attn.fused_attn for b in vit.blocks)
    assert fastpath.match_attention(vit, "none", "cpu") is True and all(b.attn.fused_attn for b in vit.blocks)
    cpu(AMX)
    assert fastpath.EXPLICIT_ATTENTION in precision_choice("auto", "cpu", VITB_FEATURES).reason
    assert fastpath.EXPLICIT_ATTENTION in precision_choice("bf16", "cpu").reason
    assert fastpath.EXPLICIT_ATTENTION not in precision_choice("auto", "cpu", MICRO_STEP).reason


def test_explicit_attention_in_bf16_computes_what_the_fused_kernel_does():
    from mimbench.testing import tiny_vit

    vit, x = tiny_vit(embed_dim=64, num_heads=4).eval(), torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fastpath.set_fused_attention(vit, True)
        fused = vit.forward_features(x).float()
        fastpath.match_attention(vit, "bf16", "cpu")
        explicit = vit.forward_features(x).float()
    assert not torch.equal(fused, explicit)  # two kernels, so bf16 rounding differs ...
    assert torch.allclose(fused, explicit, atol=0.1, rtol=0.05)  # ... within bf16's precision


def test_training_loop_and_feature_extraction_take_the_attention_of_their_precision(tmp_path, tiny_encoder):
    from mimbench.engine import LoopConfig, TrainLoop
    from mimbench.testing import tiny_vit

    vit = tiny_vit()
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    loader = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))] * 2
    TrainLoop(vit, opt, loader, lambda *a: None, LoopConfig(epochs=1, warmup_epochs=0, amp="bf16"), tmp_path)
    assert not any(b.attn.fused_attn for b in vit.blocks)
    TrainLoop(vit, opt, loader, lambda *a: None, LoopConfig(epochs=1, warmup_epochs=0, amp="none"), tmp_path)
    assert all(b.attn.fused_attn for b in vit.blocks)
    record = run_bench("features", encoder=tiny_encoder, steps=1, batch=2, warmup=0, amp="bf16", device="cpu",
                       out=tmp_path / "bench")
    assert record["protocol"]["fused_attention"] is False
    assert fastpath.EXPLICIT_ATTENTION in record["protocol"]["precision_reason"]


def test_unknown_workload_and_the_override(cpu, monkeypatch):
    cpu(AMX)
    assert precision_choice("auto", "cpu").precision == "none"  # no workload: the small side
    monkeypatch.setenv("MIMBENCH_CPU_BF16", "1")
    assert precision_choice("auto", "cpu", MICRO_STEP) == fastpath.PrecisionChoice(
        "bf16", f"auto: MIMBENCH_CPU_BF16=1; {fastpath.EXPLICIT_ATTENTION}")


def test_cuda_is_bf16_for_every_size(cpu, monkeypatch):
    cpu(AVX2)
    monkeypatch.setattr(fastpath, "_cuda_capability", lambda device: (9, 0))
    for w in (MICRO_STEP, VITB_FEATURES, None):
        assert precision_choice("auto", "cuda", w).precision == "bf16"
    monkeypatch.setattr(fastpath, "_cuda_capability", lambda device: (7, 0))
    choice = precision_choice("auto", "cuda", VITB_FEATURES)
    assert choice.precision == "fp16" and "7.0" in choice.reason


def test_workload_of_an_encoder_arch():
    arch = {"embed_dim": 768, "depth": 12, "img_size": 224, "patch_size": 16}
    assert Workload.of_arch(arch, train=False) == VITB_FEATURES
    assert Workload.of_arch(arch, train=True, keep=0.25) == VITB_STEP


def test_pretrain_workload_counts_visible_patches():
    from mimbench.config import load_config
    from pretrain import create_model, model_spec
    from pretrain.main import pretrain_workload

    cfg = load_config("pretrain/configs/mae_micro_fmnist.py", kind="pretrain")
    spec = model_spec(cfg)
    w = pretrain_workload(create_model(spec.name, **spec.kwargs), cfg)
    assert w == MICRO_STEP


def test_bench_record_states_the_choice_and_why(cpu, tmp_path):
    cpu(AMX)
    record = run_bench("pretrain", config="pretrain/configs/mae_micro_fmnist.py", steps=1, batch=2, warmup=0,
                       out=tmp_path)
    assert record["protocol"]["precision"] == "none"
    assert "CPU kind amx" in record["protocol"]["precision_reason"] and "training" in record["protocol"]["precision_reason"]


def test_bench_features_and_finetune_find_their_vit_workload():
    """bench's steps give the rule their ViT's workload (timm keeps the blocks in a Sequential): ViT-B features at
    224 are the measured 768-d x 12 x 197 inference workload, so auto there is the rule's choice, not 'unknown'."""
    import timm

    from mimbench.bench import step_workload

    vitb = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert step_workload("features", None, vitb, 224) == VITB_FEATURES
    assert step_workload("finetune", None, vitb, 224) == Workload(768, 12, 197, True)
    assert step_workload("features", None, torch.nn.Linear(2, 2), 224) is None


def test_eval_record_states_the_choice_and_why(cpu, tiny_encoder, tmp_path):
    from mimbench.evals import run_eval

    cpu(AMX)
    record = run_eval("knn", encoder=tiny_encoder, config="eval_configs/knn/dino_k20.py", data="builtin:fashion-mnist",
                      out=tmp_path, overrides=["data.limit_train=32", "data.limit_val=16", "knn.k=5"])
    assert record["hardware"]["precision"] == "none"
    assert record["hardware"]["precision_reason"].startswith("auto: CPU kind amx, inference")


def test_calibrate_times_each_candidate_and_records_it(tmp_path):
    record = run_bench("pretrain", config="pretrain/configs/mae_micro_fmnist.py", steps=2, batch=2, warmup=0,
                       amp="calibrate", out=tmp_path)
    validate_record(record)
    p, m = record["protocol"], record["metrics"]
    assert p["amp"] == "calibrate" and p["candidates"] == ["none", "bf16"]
    assert m["none_img_per_s"] > 0 and m["bf16_img_per_s"] > 0
    assert p["fastest"] == max(p["candidates"], key=lambda c: m[f"{c}_img_per_s"])
    assert m["auto_vs_fastest"] == pytest.approx(m[f"{p['precision']}_img_per_s"] / m[f"{p['fastest']}_img_per_s"])
    text = format_bench(record)
    assert f"fastest here: {p['fastest']}" in text and "amp=auto picks" in text
    assert list(tmp_path.glob("bench-*.json"))


def test_calibrate_is_refused_for_data(tmp_path):
    from mimbench.errors import MimbenchError

    with pytest.raises(MimbenchError, match="calibrate"):
        run_bench("data", data=str(tmp_path), amp="calibrate", out=tmp_path)
