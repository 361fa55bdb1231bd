"""DDAE and MAE+DDS models: MAE compatibility, losses against hand computations, EMA teacher."""
import io

import pytest
import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError
from pretrain import dds
from pretrain.models.ddae import DDAE, MAEWithDDS, default_dds_depths
from pretrain.models.mae import MaskedAutoencoderViT
from pretrain.registry import create_model, list_models

CFG = dict(
    img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)
L = 64


def make(cls, **kw):
    torch.manual_seed(0)
    return cls(**{**CFG, **kw})


def data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, L, generator=g)


def test_registry_and_default_depths():
    names = set(list_models())
    for name in ("ddae", "mae+dds", "ddae_vit_base_patch16", "ddae_vit_tiny_patch4_32", "ddae_vit_micro_patch4_32",
                 "mae+dds_vit_base_patch16", "mae+dds_vit_micro_patch4_32"):
        assert name in names
    assert default_dds_depths(12) == (4, 8, 12) and default_dds_depths(24) == (8, 16, 24)
    assert default_dds_depths(4) == (1, 3, 4) and default_dds_depths(1) == (1,)
    m = create_model("ddae_vit_micro_patch4_32")
    assert isinstance(m, DDAE) and m.dds_depths == (1, 3, 4) and m.embed_dim == 64
    assert isinstance(create_model("mae+dds", **CFG), MAEWithDDS)


def test_mae_dds_keeps_mae_state_dict_keys():
    mae = make(MaskedAutoencoderViT)
    sched = make(MAEWithDDS, dds_beta_mode="scheduled")
    assert list(sched.state_dict()) == list(mae.state_dict())
    # same seed -> same MAE weights; MAE's own checkpoint loads strictly
    for k, v in mae.state_dict().items():
        assert torch.equal(sched.state_dict()[k], v), k
    sched.load_state_dict(mae.state_dict(), strict=True)
    learn = make(MAEWithDDS)
    assert set(learn.state_dict()) - set(mae.state_dict()) == {"dds_beta.theta"}
    assert "dds_beta.theta" in learn.no_weight_decay()
    assert learn.encoder_state_dict().keys() == mae.encoder_state_dict().keys()


@pytest.mark.parametrize("cls", [MAEWithDDS, DDAE])
def test_single_last_depth_beta_zero_no_distillation_is_exactly_mae(cls):
    extra = dict(distill_weight=0.0) if cls is DDAE else {}
    mae = make(MaskedAutoencoderViT)
    dds_model = make(cls, dds_depths=(3,), dds_beta_mode="fixed", dds_beta_start=0.0, **extra)
    dds_model.load_state_dict(mae.state_dict(), strict=False)
    imgs, noise = data()
    l0, p0, m0 = mae(imgs, 0.75, noise)
    l1, p1, m1 = dds_model(imgs, 0.75, noise)
    assert torch.equal(l0, l1) and torch.equal(p0, p1) and torch.equal(m0, m1)
    # also the learnable mode at its start (theta = 0) with a zero schedule
    learn = make(MAEWithDDS, dds_depths=(3,), dds_beta_start=0.0, dds_beta_end=0.0)
    assert torch.equal(learn(imgs, 0.75, noise)[0], l0)


def test_ddae_without_distillation_has_no_teacher():
    m = make(DDAE, distill_weight=0.0)
    assert m.teacher is None and m.distill_heads is None
    assert not any(k.startswith(("teacher.", "distill_heads.")) for k in m.state_dict())
    m.on_step_end(0, 10)  # only the beta schedule moves
    assert float(m.dds_beta.progress) == pytest.approx(0.1)
    with pytest.raises(MimbenchError):
        make(DDAE, distill_weight=0.0, export_teacher=True)


def test_plug_in_progress_restored_by_set_progress():
    m = make(MAEWithDDS, dds_beta_mode="scheduled", dds_beta_schedule="linear")
    assert "dds_beta.progress" not in m.state_dict()
    m.set_progress(5, 10)  # resuming before step 5 of 10
    assert float(m.dds_beta()[0]) == pytest.approx(0.0)


def test_dds_loss_matches_hand_computation():
    model = make(MAEWithDDS, dds_depths=(1, 3), dds_weights=(0.5, 2.0), dds_beta_mode="fixed",
                 dds_beta_start=1.5, dds_distance_metric="chebyshev")
    imgs, noise = data(3, seed=1)
    loss, pred, mask = model(imgs, 0.6, noise)
    latent, mask_ref, ids_restore, (f1,) = model.forward_encoder(imgs, 0.6, noise, return_layers=[0])
    target = model.patchify(imgs)
    # distance map, weights and means written out directly in float64
    dist = dds.distance_map(mask_ref, 8, metric="chebyshev").double()
    w = torch.exp(1.5 * dist) * mask_ref
    w = w / (w.sum(1, keepdim=True) / mask_ref.sum(1, keepdim=True))
    total = 0.0
    for weight, feat in ((0.5, model.norm(f1)), (2.0, latent)):
        p = model.forward_decoder(feat, ids_restore)
        err = ((p - target) ** 2).mean(-1).double()
        total = total + weight * (err * w).sum() / mask_ref.sum()
    torch.testing.assert_close(loss.double(), total, rtol=1e-6, atol=0)
    assert torch.equal(mask, mask_ref) and torch.equal(pred, model.forward_decoder(latent, ids_restore))
    terms = model.loss_terms
    assert set(terms) >= {"loss_rec", "loss_rec_d1", "loss_rec_d3", "beta_d1", "beta_d3", "loss_dds"}
    assert terms["beta_d1"] == 1.5 and terms["loss_rec"] == terms["loss_rec_d3"]


def test_separate_norms_and_bad_arguments():
    m = make(MAEWithDDS, dds_norm="separate", dds_depths=(1, 2, 3))
    assert {k for k in m.state_dict() if k.startswith("dds_norms.")} == {
        "dds_norms.0.weight", "dds_norms.0.bias", "dds_norms.1.weight", "dds_norms.1.bias"}
    assert not any(k.startswith("dds_norms") for k in m.encoder_state_dict())
    imgs, noise = data()
    m(imgs, 0.75, noise)[0].backward()
    assert m.dds_norms[0].weight.grad is not None
    for kw in (dict(dds_depths=(1, 2)), dict(dds_depths=(0, 3)), dict(dds_weights=(1.0,)),
               dict(dds_norm="per_depth"), dict(dds_distance_metric="cosine"), dict(dds_beta_reg=-1)):
        with pytest.raises(MimbenchError):
            make(MAEWithDDS, **kw)
    for kw in (dict(distill_depths=(2,), dds_depths=(1, 3)), dict(distill_tokens="all"),
               dict(distill_loss="l1"), dict(ema_momentum=1.1)):
        with pytest.raises(MimbenchError):
            make(DDAE, **kw)


def test_scheduled_beta_follows_on_step_end():
    m = make(MAEWithDDS, dds_beta_mode="scheduled", dds_beta_start=-2.0, dds_beta_end=2.0, dds_beta_schedule="linear")
    imgs, noise = data()
    seen = []
    for it in (None, 0, 4, 9):
        if it is not None:
            m.on_step_end(it, 10)
        m(imgs, 0.75, noise)
        seen.append([m.loss_terms[f"beta_d{d}"] for d in m.dds_depths])
    assert seen == [[-2.0] * 3, [pytest.approx(-1.6)] * 3, [pytest.approx(0.0)] * 3, [pytest.approx(2.0)] * 3]


def test_learnable_beta_reg_adds_penalty():
    m = make(MAEWithDDS, dds_beta_reg=0.5, dds_beta_bound=0.5)
    with torch.no_grad():
        m.dds_beta.theta.fill_(1.0)
    imgs, noise = data()
    loss = m(imgs, 0.75, noise)[0]
    reg = 3 * (0.5 * torch.tanh(torch.tensor(1.0))) ** 2
    assert m.loss_terms["loss_beta_reg"] == pytest.approx(float(reg), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(m.loss_terms["loss_dds"], rel=1e-6)
    loss.backward()
    assert m.dds_beta.theta.grad is not None and torch.isfinite(m.dds_beta.theta.grad).all()


def test_ddae_decoder_with_hidden_equals_mae_decoder():
    m = make(DDAE)
    imgs, noise = data()
    latent, _, ids_restore = m.forward_encoder(imgs, 0.75, noise)
    hidden, pred = m._decode_depth(latent, ids_restore)
    assert hidden.shape == (2, L + 1, 16)
    assert torch.equal(pred, m.forward_decoder(latent, ids_restore))


def test_ddae_distillation_loss_matches_hand_computation():
    m = make(DDAE, dds_depths=(2, 3), distill_depths=(2,), dds_beta_mode="fixed", dds_beta_start=0.0,
             distill_loss="mse")
    with torch.no_grad():  # make the teacher differ from the student
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    imgs, noise = data()
    loss = m(imgs, 0.75, noise)[0]
    _, mask, ids_restore, (f2,) = m.forward_encoder(imgs, 0.75, noise, return_layers=[1])
    hidden, _ = m._decode_depth(m.norm(f2), ids_restore)
    # teacher: every patch through the first two teacher blocks
    t = m.teacher
    x = t.patch_embed(imgs) + t.pos_embed[:, 1:]
    x = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    x = t.blocks[1](t.blocks[0](x))
    tgt = F.layer_norm(x, (32,))[:, 1:]
    per_patch = ((m.distill_heads[0](hidden[:, 1:]) - tgt) ** 2).mean(-1)
    ref = (per_patch * mask).sum() / mask.sum()
    ref = float(ref.detach())
    assert m.loss_terms["loss_distill_d2"] == pytest.approx(ref, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(m.loss_terms["loss_dds"] + ref, rel=1e-5)


def test_ddae_teacher_gets_no_gradient_and_moves_by_the_momentum():
    m = make(DDAE, ema_momentum=0.9, ema_momentum_end=1.0)
    teacher_names = {n for n, _ in m.named_parameters() if n.startswith("teacher.")}
    assert teacher_names and all(not p.requires_grad for n, p in m.named_parameters() if n in teacher_names)
    # the teacher starts as a copy of the student encoder
    enc = m.encoder_state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in m.teacher.state_dict().items())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    assert not any(p is q for g in opt.param_groups for p in g["params"] for q in m.teacher.parameters())
    imgs, noise = data()
    m.train()
    assert not m.teacher.training
    loss = m(imgs, 0.75, noise)[0]
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    opt.step()
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student = m.encoder_state_dict()
    m.on_step_end(4, 10)  # progress 0.5 -> m = 1 - 0.1 * (1 + cos(pi/2)) / 2 = 0.95
    mom = dds.ema_momentum(0.5, 0.9, 1.0)
    assert mom == pytest.approx(0.95)
    moved = 0
    for k, t_new in m.teacher.state_dict().items():
        expected = mom * before[k] + (1 - mom) * student[k]
        torch.testing.assert_close(t_new, expected, rtol=0, atol=1e-6)
        moved += int(not torch.equal(t_new, before[k]))
    assert moved > 5
    assert torch.equal(m.teacher.pos_embed, m.pos_embed)  # frozen sin-cos copied exactly
    m(imgs, 0.75, noise)
    assert m.loss_terms["ema_momentum"] == pytest.approx(0.95)


def test_ddae_export_and_checkpoint_round_trip():
    m = make(DDAE)
    mae = make(MaskedAutoencoderViT)
    assert list(m.encoder_state_dict()) == list(mae.encoder_state_dict())
    imgs, noise = data()
    m(imgs, 0.75, noise)[0].backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    m.on_step_end(2, 10)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert any(k.startswith("teacher.") for k in sd) and "dds_beta.progress" in sd
    other = make(DDAE)
    other.load_state_dict(sd, strict=True)
    assert float(other.dds_beta.progress) == pytest.approx(0.3)
    assert torch.equal(m(imgs, 0.75, noise)[0], other(imgs, 0.75, noise)[0])
    t = make(DDAE, export_teacher=True)
    t.load_state_dict(sd)
    exp = t.encoder_state_dict()
    assert list(exp) == list(m.teacher.state_dict()) and set(exp) == set(mae.encoder_state_dict())
    assert torch.equal(exp["blocks.0.attn.qkv.weight"], m.teacher.blocks[0].attn.qkv.weight)


def test_ddae_visible_token_distillation_runs():
    m = make(DDAE, distill_tokens="visible", distill_loss="cosine")
    imgs, noise = data()
    loss = m(imgs, 0.75, noise)[0]
    loss.backward()
    assert torch.isfinite(loss) and m.distill_heads[0].weight.grad is not None
    assert {f"loss_distill_d{d}" for d in m.dds_depths} <= set(m.loss_terms)


def test_ddae_no_visible_patch_is_a_clear_error():
    m = make(DDAE)
    imgs, _ = data()
    with pytest.raises(ValueError, match="no visible patch"):
        m(imgs, 0.99)


def test_ddae_micro_preset_training_steps():
    torch.manual_seed(0)
    m = create_model("ddae_vit_micro_patch4_32")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    imgs = torch.randn(4, 3, 32, 32)
    losses = []
    for it in range(3):
        loss, pred, mask = m(imgs)
        assert torch.isfinite(loss) and pred.shape == (4, 64, 48) and mask.shape == (4, 64)
        opt.zero_grad()
        loss.backward()
        # intermediate supervision reaches the first block through its own loss
        assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        opt.step()
        m.on_step_end(it, 3)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert m.loss_terms["beta_d4"] != -1.0  # the schedule moved


def test_learnable_beta_in_model_stays_within_bound_of_schedule():
    m = make(MAEWithDDS, dds_beta_bound=0.5, dds_beta_schedule="linear")
    opt = torch.optim.SGD([m.dds_beta.theta], lr=1e4)  # a huge step: tanh must still bound it
    imgs, noise = data()
    for it in range(4):
        loss = m(imgs, 0.75, noise)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.on_step_end(it, 4)
    sched = -1.0 + 2.0 * float(m.dds_beta.progress)
    betas = m.dds_beta().detach()
    assert m.dds_beta.theta.abs().max() > 0.1  # it did learn something
    assert ((betas - sched).abs() <= 0.5 + 1e-6).all() and (betas >= 0.5 - 1e-6).all()
