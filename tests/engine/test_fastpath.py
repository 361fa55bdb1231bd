"""The fast path: precision choice, bf16 numerics, fused attention (dropout semantics), foreach EMA and AdamW."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mimbench import engine, fastpath
from mimbench.errors import MimbenchError
from pretrain import create_model

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("text, expected", [(X86_AVX2, False), (X86_BF16, True), (ARM_BF16, True), ("", False)])
def test_bf16_detection_from_cpuinfo(text, expected):
    assert fastpath.cpuinfo_has_bf16(text) is expected


@pytest.mark.parametrize("forced, expected", [("1", "bf16"), ("0", "none")])
def test_auto_follows_cpu_capability(monkeypatch, forced, expected):
    monkeypatch.setenv("MIMBENCH_CPU_BF16", forced)
    assert fastpath.resolve_amp("auto", "cpu") == expected
    assert fastpath.resolve_amp("auto", "cuda") == "bf16"
    assert fastpath.resolve_amp("none", "cuda") == "none"
    assert fastpath.resolve_amp("bf16", "cpu") == "bf16"


def test_bad_amp_is_refused():
    with pytest.raises(MimbenchError, match="amp='fp8'"):
        fastpath.resolve_amp("fp8", "cpu")


@pytest.mark.parametrize("forced, dtype", [("1", torch.bfloat16), ("0", None)])
def test_training_loop_runs_under_the_resolved_precision(monkeypatch, tmp_path, forced, dtype):
    monkeypatch.setenv("MIMBENCH_CPU_BF16", forced)
    model = torch.nn.Linear(4, 2)
    seen = []

    def step(m, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return m(batch[0]).pow(2).mean(), {}

    loader = [(torch.randn(3, 4),)] * 2
    engine.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, step,
               engine.LoopConfig(epochs=1, warmup_epochs=0, progress=False), tmp_path)
    assert seen == [dtype, dtype]


def _loss_and_grad(model, imgs, noise, bf16: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same dropout / EMA-free path in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _, _ = model(imgs, noise=noise)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


@pytest.mark.parametrize("name", ["mae_vit_micro_patch4_32", "ddae_vit_micro_patch4_32"])
def test_bf16_step_matches_fp32_within_tolerance(name):
    """Stated tolerance: one step's loss under bf16 autocast within 0.5 % (relative) of fp32 on the same
    batch and mask, and the gradient pointing the same way (cosine > 0.99). Measured: < 0.06 %."""
    torch.manual_seed(0)
    model = create_model(name)
    model.train()
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    ref = copy.deepcopy(model)
    l32, g32 = _loss_and_grad(ref, imgs, noise, bf16=False)
    l16, g16 = _loss_and_grad(model, imgs, noise, bf16=True)
    assert l16 != l32  # bf16 really ran
    assert abs(l16 / l32 - 1) < 5e-3
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


@pytest.mark.parametrize("name", ["mae_vit_micro_patch4_32", "robust_mae_vit_micro_patch4_32",
                                  "ddae_vit_micro_patch4_32"])
def test_every_attention_uses_sdpa(name):
    model = create_model(name)
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attns and all(m.fused_attn for m in attns)
    assert fastpath.set_fused_attention(model, False) == len(attns)
    assert not any(m.fused_attn for m in attns)


def _probe_attention(fused: bool, p: float):
    """A timm Attention whose output *is* its (dropped-out) attention matrix: q = k = 0 gives uniform
    probabilities 1/N, v and proj are identities, the input tokens are the N unit vectors."""
    from timm.models.vision_transformer import Attention

    n = 64
    attn = Attention(n, num_heads=1, qkv_bias=False, attn_drop=p)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.weight[2 * n:].copy_(torch.eye(n))
        attn.proj.weight.copy_(torch.eye(n))
        attn.proj.bias.zero_()
    attn.fused_attn = fused
    return attn, torch.eye(n).expand(16, n, n)


@pytest.mark.parametrize("fused", [True, False])
def test_sdpa_attention_dropout_drops_probabilities_like_the_explicit_path(fused):
    """The robust-MAE decoder's attention dropout: each attention probability is zeroed with
    probability p and the others scaled by 1/(1-p), in training mode only - on both paths."""
    p, n = 0.25, 64
    attn, x = _probe_attention(fused, p)
    attn.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = attn(x)
    kept = 1.0 / (n * (1 - p))
    assert torch.all((out.abs() < 1e-6) | ((out - kept).abs() < 1e-5))
    assert abs(float((out.abs() < 1e-6).float().mean()) - p) < 0.02
    attn.eval()
    with torch.no_grad():
        assert torch.allclose(attn(x), torch.full_like(x, 1.0 / n), atol=1e-6)


def test_robust_decoder_attention_dropout_is_kept():
    model = create_model("robust_mae_vit_micro_patch4_32")
    assert all(b.attn.fused_attn and b.attn.attn_drop.p == pytest.approx(0.1) for b in model.decoder_blocks)
    assert all(b.attn.attn_drop.p == 0 for b in model.blocks)


def test_foreach_ema_is_the_per_tensor_update_bit_for_bit():
    torch.manual_seed(0)
    model = create_model("ddae_vit_micro_patch4_32")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = {}
    for name, t in model.teacher.named_parameters():
        s = model.get_parameter(name)
        expected[name] = (t.detach() * 0.9).add(s.detach(), alpha=0.1) if s.requires_grad else s.detach().clone()
    model.update_teacher(0.9)
    for name, t in model.teacher.named_parameters():
        assert torch.equal(t, expected[name]), name
    assert model.teacher.pos_embed.requires_grad is False


def test_pretrain_adamw_is_multi_tensor_and_matches_the_loop():
    from pretrain.main import build_optimizer

    torch.manual_seed(0)
    fast_model = create_model("mae_vit_micro_patch4_32")
    plain_model = copy.deepcopy(fast_model)
    fast = build_optimizer(fast_model, lr=1e-3, weight_decay=0.05)
    plain = build_optimizer(plain_model, lr=1e-3, weight_decay=0.05, fast=False)
    assert fast.defaults["foreach"] is True and plain.defaults["foreach"] is False
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    for model, opt in ((fast_model, fast), (plain_model, plain)):
        for _ in range(2):
            loss, _, _ = model(imgs, noise=noise)
            loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fast_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow  # a cold inductor compile takes tens of seconds
def test_compile_keeps_state_dict_keys_and_results():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    keys = list(model.state_dict())
    x = torch.randn(4, 8)
    eager = model(x)
    assert fastpath.maybe_compile(model, False) is model
    fastpath.maybe_compile(model, True)
    assert list(model.state_dict()) == keys
    assert torch.allclose(model(x), eager, atol=1e-5)
