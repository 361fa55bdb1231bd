"""torch.compile on the pre-training models: per-step values (teacher momentum, EMA target statistics) are
tensors updated in place, so a compiled forward is traced once and has no graph break."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from pretrain.dds import ema_momentum
from pretrain.models.ddae import DDAE
from pretrain.models.mae import ROBUST_RECIPE, MaskedAutoencoderViT

CFG = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
           decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, generator=g)


def test_ddae_compiles_at_most_twice_over_twelve_steps():
    torch.manual_seed(0)
    model = DDAE(**CFG, dds_depths=(1, 2), ema_momentum=0.9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)  # as runtime.compile does
    torch._dynamo.reset()
    momenta = []
    for it in range(12):
        imgs, noise = batch(it)
        loss = compiled(imgs, 0.75, noise)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.on_step_end(it, 12)  # a new teacher momentum every step
        momenta.append(model.loss_terms["ema_momentum"])
    torch._dynamo.reset()
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    # the logged momentum still follows the schedule: step k logs the update after step k - 1
    expected = [0.9] + [ema_momentum(k / 12, 0.9, 1.0) for k in range(1, 12)]
    assert momenta == pytest.approx(expected, abs=1e-6)


def test_robust_mae_forward_has_no_graph_break():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**CFG, **{**ROBUST_RECIPE, "decoder_attn_drop": 0.0}, mask_token_layer=1)
    imgs, noise = batch(0)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(imgs, 0.75, noise)
    torch._dynamo.reset()
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    assert int(model.target_normalizer.num_updates) == 1  # the EMA statistics were updated by the traced step
