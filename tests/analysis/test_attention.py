"""Mean attention distance and entropy: a hand-computed 2x2-patch example, and timm's own attention probabilities
(ViT, BEiT with relative position bias, Eva with rope) captured independently against the hooks' numbers."""
from __future__ import annotations

import math

import pytest
import torch
from timm.models.beit import Beit
from timm.models.eva import Eva

from mimbench.analysis import AttentionUnreadable, attention_distance, attention_entropy
from mimbench.analysis.attention import attention_measures, patch_geometry, query_measures
from mimbench.testing import perturb, tiny_vit

DIAG = 8 * math.sqrt(2)  # 2x2 grid of 8-pixel patches: centres 8 px apart side by side, 8*sqrt(2) across


def test_hand_built_2x2_example():
    # one image, one head, a class token and 4 patches (16x16 pixels, patch 8)
    uniform = [0.2] * 5
    probs = torch.tensor([[[[0.2, 0.2, 0.2, 0.2, 0.2],  # class-token query: not counted
                            [0.2, 0.4, 0.2, 0.2, 0.0],  # patch 0: patch keys renormalised to 0.5, 0.25, 0.25, 0
                            uniform, uniform, uniform]]])
    model = tiny_vit(img_size=16, patch_size=8, depth=1, num_heads=1)
    distances = patch_geometry(model)
    assert distances[0].tolist() == pytest.approx([0.0, 8.0, 8.0, DIAG])
    distance, entropy = query_measures(probs, distances, prefix=1)
    # patch 0: 0.25 * 8 + 0.25 * 8 = 4; the others: 0.25 * (0 + 8 + 8 + 8 sqrt 2) = 4 + 2 sqrt 2
    assert distance.flatten().tolist() == pytest.approx([4.0] + [4 + 2 * math.sqrt(2)] * 3, abs=1e-6)
    assert distance.mean().item() == pytest.approx(4 + 1.5 * math.sqrt(2), abs=1e-6)
    # entropies: 1.5 ln 2 (0.5, 0.25, 0.25), then ln 4 for uniform attention over 4 patches
    assert entropy.mean().item() == pytest.approx((1.5 + 3 * 2) / 4 * math.log(2), abs=1e-6)


def test_uniform_attention_of_a_model_with_zero_query_key_weights():
    """q = k = 0: every token gets 1/5 of each query's attention, so every patch query's mean distance is
    (0 + 8 + 8 + 8 sqrt 2) / 4 and its entropy ln 4, in every block and head."""
    model = tiny_vit(img_size=16, patch_size=8, depth=2, num_heads=2)
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    images = torch.randn(3, 3, 16, 16)
    expected = torch.full((2, 2), (16 + DIAG) / 4)
    assert torch.allclose(attention_distance(model, images), expected, atol=1e-5)
    assert torch.allclose(attention_entropy(model, images), torch.full((2, 2), math.log(4)), atol=1e-5)


def _timm_probs(model, images) -> list[torch.Tensor]:
    """timm's own attention probabilities of every block: its non-fused path feeds them to ``attn_drop``."""
    caught: list[torch.Tensor] = []
    hooks = []
    for block in model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, args, out: caught.append(args[0].detach())))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for block in model.blocks:
            block.attn.fused_attn = True
    return caught


def _by_hand(model, images, prefix: int):
    """Distance and entropy (depth x heads) written out from timm's probabilities, without the project's code."""
    gh, gw = model.patch_embed.grid_size
    ph, pw = model.patch_embed.patch_size
    centres = torch.tensor([[(r + 0.5) * ph, (c + 0.5) * pw] for r in range(gh) for c in range(gw)],
                           dtype=torch.float64)
    d = ((centres[:, None] - centres[None]) ** 2).sum(-1).sqrt()
    dist, ent = [], []
    for probs in _timm_probs(model, images):
        p = probs.double()[:, :, prefix:, prefix:]
        p = p / p.sum(-1, keepdim=True)
        dist.append((p * d).sum(-1).mean(dim=(0, 2)))
        ent.append((-(p * torch.where(p > 0, p.log(), torch.zeros_like(p)))).sum(-1).mean(dim=(0, 2)))
    return torch.stack(dist).float(), torch.stack(ent).float()


def _vit(reg_tokens: int):
    return perturb(tiny_vit(depth=3, num_heads=4, flags={"reg_tokens": reg_tokens}), scale=0.5).eval()


def _beit():
    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                 use_rel_pos_bias=True, use_abs_pos_emb=False)
    return perturb(model, scale=0.5).eval()


def _eva():
    model = Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, use_rot_pos_emb=True,
                qkv_fused=True)
    return perturb(model, scale=0.5).eval()


@pytest.mark.parametrize("build", [lambda: _vit(0), lambda: _vit(2), _beit, _eva],
                         ids=["vit", "vit-registers", "beit-relpos", "eva-rope"])
def test_hooks_match_timms_own_attention(build):
    model = build()
    images = torch.randn(5, 3, 32, 32)
    prefix = int(model.num_prefix_tokens)
    want_dist, want_ent = _by_hand(model, images, prefix)
    got = attention_measures(model, images, batch_size=2)  # batches of 2: the sums cross batches
    assert got["distance"].shape == (len(model.blocks), model.blocks[0].attn.num_heads)
    assert torch.allclose(got["distance"], want_dist, atol=1e-5, rtol=0)
    assert torch.allclose(got["entropy"], want_ent, atol=1e-5, rtol=0)
    assert float(want_dist.std()) > 0  # perturbed weights: the heads differ, so the comparison is not trivial


def test_an_unreadable_attention_module_is_refused_with_the_reason():
    model = tiny_vit()

    class Fused(torch.nn.Module):
        num_heads = 2

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, **kwargs):
            return self.inner(x, **kwargs)

    model.blocks[1].attn = Fused(model.blocks[1].attn)
    with pytest.raises(AttentionUnreadable, match="Fused cannot be read"):
        attention_distance(model, torch.randn(2, 3, 32, 32))
