"""BEiT v2 pre-training: mask token at the input, token cross-entropy on masked positions only, the
class-token head, the BEiT-family export, and DDS shared with MAE+DDS (one function, two callers)."""
from functools import partial
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError
from pretrain import create_model
from pretrain import dds
from pretrain.contract import VisualTokenizer

VOCAB = 32


class FixedTokens(VisualTokenizer):
    """A tokenizer stand-in whose ids are set by the test."""

    def __init__(self, grid=4, num_tokens=VOCAB):
        super().__init__()
        self.num_tokens, self.grid_size = num_tokens, (grid, grid)
        self.ids = None

    def tokenize(self, imgs):
        return self.ids[: imgs.shape[0]].to(imgs.device)


def _model(name="beitv2", tok=None, **kw):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_mask_patches=6,
                min_mask_patches_per_block=2)
    args.update(kw)
    torch.manual_seed(0)
    return create_model(name, tokenizer=tok or FixedTokens(), **args)


def _batch(n=3):
    torch.manual_seed(1)
    imgs = torch.randn(n, 3, 16, 16)
    ids = torch.randint(0, VOCAB, (n, 16))
    mask = torch.zeros(n, 16, dtype=torch.bool)
    mask[0, [0, 1, 4, 5]] = True
    mask[1, [10, 11, 14, 15, 9, 13]] = True
    mask[2, 5] = True
    return imgs, ids, mask


def test_masks_from_per_image_generators_are_the_models_block_masks():
    m = _model()

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = m.draw_mask(3, device="cpu", generators=gens(5, 6, 7))
    assert a.shape == (3, 16) and a.dtype == torch.bool and (a.sum(1) <= 6).all() and (a.sum(1) > 0).all()
    assert torch.equal(a[1:], m.draw_mask(2, device="cpu", generators=gens(6, 7)))
    assert torch.equal(a, m.mask_generator.batch(3, gens(5, 6, 7)))


def test_loss_is_cross_entropy_over_masked_positions_only():
    m = _model()
    imgs, ids, mask = _batch()
    m.tokenizer.ids = ids
    m.train()
    loss, logits, maskf = m(imgs, mask=mask)
    assert logits.shape == (3, 16, VOCAB) and torch.equal(maskf, mask.float())
    ref = F.cross_entropy(logits[mask], ids[mask])  # mean over the batch's 11 masked patches
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # the ids of visible patches do not matter; those of masked ones do
    other = ids.clone()
    other[~mask] = (other[~mask] + 1) % VOCAB
    m.tokenizer.ids = other
    assert m(imgs, mask=mask)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    other[0, 0] = (other[0, 0] + 1) % VOCAB
    assert m(imgs, mask=mask)[0].item() != pytest.approx(loss.item(), rel=1e-6)


def test_masked_patches_are_replaced_by_the_mask_token_at_the_input():
    m = _model()
    imgs, ids, mask = _batch()
    m.tokenizer.ids = ids
    m.eval()
    _, logits, _ = m(imgs, mask=mask)
    # change the pixels of the masked patch 0 of image 0 (rows 0-3, cols 0-3): nothing changes
    changed = imgs.clone()
    changed[0, :, :4, :4] = 100.0
    assert torch.equal(m(changed, mask=mask)[1], logits)
    # change a visible patch (patch 2: cols 8-11): the prediction changes
    changed[0, :, :4, 8:12] = 100.0
    assert not torch.allclose(m(changed, mask=mask)[1], logits)
    # the mask token is what the masked positions see: it gets a gradient, only from masked patches
    m.train()
    m(imgs, mask=mask)[0].backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_block_masks_are_drawn_when_none_is_given():
    m = _model(num_mask_patches=6)
    imgs, ids, _ = _batch()
    m.tokenizer.ids = ids
    torch.manual_seed(5)
    _, _, maskf = m(imgs)
    assert (maskf.sum(1) <= 6).all() and maskf.sum() >= 15
    with pytest.raises(MimbenchError, match="mask must be"):
        m(imgs, mask=torch.zeros(3, 15, dtype=torch.bool))


def test_class_token_head_adds_its_own_cross_entropy():
    m = _model(cls_pt=True, cls_pt_early_layers=2, cls_pt_head_layers=1)
    imgs, ids, mask = _batch()
    m.tokenizer.ids = ids
    m.train()
    loss, logits, _ = m(imgs, mask=mask)
    terms = m.loss_terms
    assert set(terms) >= {"loss_mim", "loss_cls_pt", "mlm_acc"}
    assert loss.item() == pytest.approx(terms["loss_mim"] + terms["loss_cls_pt"], rel=1e-6)
    # by hand: final class token + patch tokens after block 2 -> head block -> shared norm and lm_head
    x, x_cls, _ = m.forward_features(imgs, mask)
    enc = m.encoder
    y = enc.patch_embed(imgs)
    y = y * (~mask).unsqueeze(-1) + m.mask_token * mask.unsqueeze(-1)
    y = torch.cat([enc.cls_token.expand(3, -1, -1), y], 1)
    rel = enc.rel_pos_bias()
    for blk in enc.blocks[:2]:
        y = blk(y, shared_rel_pos_bias=rel)
    head_in = torch.cat([x[:, :1], y[:, 1:]], 1)
    want = m.cls_pt_layers[0](head_in, shared_rel_pos_bias=rel)
    assert torch.allclose(x_cls, want, atol=1e-5)
    ref = F.cross_entropy(m.lm_head(enc.norm(want))[:, 1:][mask], ids[mask])
    assert terms["loss_cls_pt"] == pytest.approx(ref.item(), rel=1e-5)
    # the head is pre-training only: not in the exported encoder
    assert not any(k.startswith("cls_pt") for k in m.encoder_state_dict())


def test_export_is_a_timm_beit_state_dict(tmp_path):
    from timm.models.beit import Beit

    m = _model(layer_scale_init_value=0.1)
    sd = m.encoder_state_dict()
    assert "rel_pos_bias.relative_position_bias_table" in sd and "blocks.0.gamma_1" in sd and "norm.weight" in sd
    assert not any("relative_position_index" in k or k.startswith(("head", "mask_token", "lm_head")) for k in sd)
    beit = Beit(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0, global_pool="token",
                use_fc_norm=False, init_values=0.1, use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    beit.load_state_dict(sd, strict=True)
    imgs, ids, _ = _batch()
    m.tokenizer.ids = ids
    m.eval()
    beit.eval()
    # with nothing masked the pre-training encoder is exactly the exported Beit
    x, _, _ = m.forward_features(imgs, torch.zeros(3, 16, dtype=torch.bool))
    assert torch.allclose(m.encoder.norm(x), beit.forward_features(imgs), atol=1e-6)
    meta = m.encoder_family_metadata()
    assert meta == {"use_abs_pos_emb": "false", "use_rel_pos_bias": "false", "use_shared_rel_pos_bias": "true",
                    "layer_scale_init_value": "0.1"}


def test_export_through_the_encoder_file(tmp_path):
    from mimbench import load_encoder
    from mimbench.encoders import read_metadata

    m = _model(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, layer_scale_init_value=0.0)
    path = m.export(tmp_path / "encoder.safetensors", technique="beitv2", epochs=1.0, data="builtin:fashion-mnist")
    meta = read_metadata(path)
    assert meta["family"] == "beit" and meta["use_rel_pos_bias"] == "true" and meta["layer_scale_init_value"] == "0.0"
    enc = load_encoder(path)
    imgs, _, _ = _batch()
    m.eval()
    x, _, _ = m.forward_features(imgs, torch.zeros(3, 16, dtype=torch.bool))
    assert torch.allclose(m.encoder.norm(x), enc.forward_features(imgs), atol=1e-6)


# ---------------------------------------------------------------------- DDS
def test_dds_is_one_function_with_two_callers():
    """MAE+DDS and BEiT v2+DDS both compute their loss through pretrain.dds.deep_dynamic_supervision."""
    real, returns = dds.deep_dynamic_supervision, []

    def record(*args, **kwargs):
        returns.append(real(*args, **kwargs))
        return returns[-1]

    with mock.patch.object(dds, "deep_dynamic_supervision", side_effect=record) as spy:
        mae = create_model("mae+dds", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        mae_loss, _, _ = mae(torch.randn(2, 3, 16, 16), mask_ratio=0.75)
        assert spy.call_count == 1
        assert mae_loss.item() == pytest.approx((returns[-1].total).item(), rel=1e-6)
        beit = _model("beitv2+dds")
        imgs, ids, mask = _batch()
        beit.tokenizer.ids = ids
        beit_loss, _, _ = beit(imgs, mask=mask)
        assert spy.call_count == 2
        assert beit_loss.item() == pytest.approx((returns[-1].total).item(), rel=1e-6)
    # and the BEiT caller hands it per-patch cross-entropies, one per supervised depth
    args = spy.call_args_list[1].args
    assert len(args[0]) == len(beit.dds_depths) == 3 and args[0][0].shape == (3, 16)


def test_beitv2_dds_reduces_to_beitv2_without_depths_or_dynamics():
    imgs, ids, mask = _batch()
    plain = _model("beitv2")
    dds_model = _model("beitv2+dds", dds_depths=[4], dds_beta_mode="fixed", dds_beta_start=0.0)
    dds_model.load_state_dict(plain.state_dict(), strict=False)
    for m in (plain, dds_model):
        m.tokenizer.ids = ids
        m.train()
    a = plain(imgs, mask=mask)[0]
    b = dds_model(imgs, mask=mask)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_beitv2_dds_intermediate_depth_loss_by_hand():
    m = _model("beitv2+dds", dds_depths=[2, 4], dds_beta_mode="fixed", dds_beta_start=1.5)
    imgs, ids, mask = _batch()
    m.tokenizer.ids = ids
    m.eval()
    loss, logits, _ = m(imgs, mask=mask)
    _, _, feats = m.forward_features(imgs, mask, [2])
    ce2 = F.cross_entropy(m.lm_head(m.encoder.norm(feats[0]))[:, 1:].transpose(1, 2), ids, reduction="none")
    ce4 = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    dist = dds.distance_map(mask.float(), 4)
    w = dds.dynamic_weights(dist, mask.float(), 1.5)
    want = [(ce * w * mask).sum() / mask.sum() for ce in (ce2, ce4)]
    assert m.loss_terms["loss_mim_d2"] == pytest.approx(want[0].item(), rel=1e-5)
    assert m.loss_terms["loss_mim_d4"] == pytest.approx(want[1].item(), rel=1e-5)
    assert loss.item() == pytest.approx((want[0] + want[1]).item(), rel=1e-5)
    # far patches weigh more with beta > 0 (image 1 masks a 2x3 block: its inner patches are farther)
    assert w[1, 15] > w[1, 10]


def test_dds_beta_schedule_advances_and_is_checkpointed():
    m = _model("beitv2+dds", dds_beta_mode="scheduled")
    m.on_step_end(9, 10)
    assert float(m.dds_beta.progress) == 1.0 and "dds_beta.progress" in m.state_dict()
    assert float(m.dds_beta()[0]) == pytest.approx(1.0)


def test_tokenizer_grid_must_match():
    with pytest.raises(MimbenchError, match="token grid"):
        _model(tok=FixedTokens(grid=8))
    with pytest.raises(MimbenchError, match="needs a tokenizer"):
        create_model("beitv2", tokenizer=None, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_weight_decay_groups_follow_the_official_skip_list():
    from pretrain.main import build_optimizer

    m = _model()
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n: id(p) in decayed for n, p in m.named_parameters() if p.requires_grad}
    assert names["mask_token"] and names["encoder.rel_pos_bias.relative_position_bias_table"]  # 3-D / 2-D: decayed
    assert names["encoder.blocks.0.attn.qkv.weight"] and names["lm_head.weight"]
    assert not names["encoder.cls_token"] and not names["encoder.blocks.0.gamma_1"] and not names["lm_head.bias"]
    assert not any(n.startswith("tokenizer.") for n in names)  # frozen: never optimised
