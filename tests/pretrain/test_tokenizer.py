"""VQ-KD tokenizer: codebook lookup, EMA update, usage statistics, dead-code restart, the tokenizer file,
and the strict mapping of the official BEiT v2 checkpoint layout (key names and shapes of
microsoft/unilm beit2 modeling_vqkd.py / norm_ema_quantizer.py)."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError
from pretrain.models.vqkd import VQKD, NormEMAQuantizer
from pretrain.tokenizer import load_tokenizer, map_official_vqkd


def _unit(x):
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------------- quantiser
def test_lookup_picks_the_nearest_unit_code_whatever_the_input_scale():
    q = NormEMAQuantizer(4, 3, kmeans_init=False)
    q.codebook.copy_(_unit(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, 0]])))
    z = torch.tensor([[[5.0, 0.1, 0.0], [0.0, 0.2, -3.0], [-0.3, -0.2, 0.0], [0.1, 7.0, 0.2]]])
    # [0, 0.2, -3]: cosine 0.07 with code 1, the largest (-1.0 with code 2, -0.05 with code 3, 0 with code 0)
    assert q.lookup(z).tolist() == [[0, 1, 3, 1]]
    q.eval()
    zq, ids, loss = q(z)
    assert ids.tolist() == [[0, 1, 3, 1]]
    assert torch.allclose(zq, q.codebook[ids])  # forward value = the codes
    assert loss == pytest.approx(float(F.mse_loss(q.codebook[ids], _unit(z))), rel=1e-6)


def test_straight_through_gradient_and_commitment_gradient():
    q = NormEMAQuantizer(8, 4, kmeans_init=False, dead_code_ratio=0.0)
    q.eval()
    z = torch.randn(2, 5, 4, requires_grad=True)
    zq, _, loss = q(z)
    g = torch.randn_like(zq)
    (zq * g).sum().backward()
    u = _unit(z.detach()).requires_grad_(True)
    (u * g).sum().backward()  # straight-through: d z_q / d z = d normalize(z) / d z
    assert torch.allclose(z.grad, torch.autograd.grad((_unit(z) * g).sum(), z)[0], atol=1e-6)
    assert q.codebook.grad is None  # the codebook is a buffer, moved only by the EMA


def test_ema_update_moves_used_codes_towards_their_mean_and_keeps_unit_norm():
    q = NormEMAQuantizer(3, 2, decay=0.9, kmeans_init=False, dead_code_ratio=0.0)
    q.codebook.copy_(_unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])))
    z = torch.tensor([[[1.0, 0.2], [1.0, 0.4], [0.1, 1.0]]])  # two vectors to code 0, one to code 1
    q.train()
    _, ids, _ = q(z)
    assert ids.tolist() == [[0, 0, 1]]
    zn = _unit(z[0])
    mean0 = _unit(zn[:2].mean(0))
    want0 = _unit(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * mean0)
    want1 = _unit(0.9 * torch.tensor([0.0, 1.0]) + 0.1 * zn[2])
    assert torch.allclose(q.codebook[0], want0, atol=1e-6) and torch.allclose(q.codebook[1], want1, atol=1e-6)
    assert torch.equal(q.codebook[2], torch.tensor([-1.0, 0.0]))  # unused code unchanged
    assert torch.allclose(q.usage, torch.tensor([0.2, 0.1, 0.0]))  # (1 - decay) x counts
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(3))


def test_usage_statistics():
    q = NormEMAQuantizer(4, 2, kmeans_init=False, dead_code_ratio=0.5)
    assert q.usage_stats() == {"codes_used": 0.0, "perplexity": 0.0}
    q.usage.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    s = q.usage_stats()
    assert s["codes_used"] == 1.0 and s["perplexity"] == pytest.approx(4.0)
    q.usage.copy_(torch.tensor([2.0, 2.0, 0.0, 0.0]))  # mean 1, threshold 0.5
    s = q.usage_stats()
    assert s["codes_used"] == 0.5 and s["perplexity"] == pytest.approx(2.0)


def test_dead_codes_are_restarted_from_the_batch_and_get_a_grace_usage():
    torch.manual_seed(0)
    q = NormEMAQuantizer(4, 3, decay=0.99, kmeans_init=False, dead_code_ratio=0.1)
    q.codebook.copy_(_unit(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])))
    q.usage.copy_(torch.tensor([10.0, 10.0, 0.001, 0.001]))
    z = torch.tensor([[[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.9, 0.0, 0.1]]])  # only codes 0 and 1 used
    q.train()
    q(z)
    assert q.last_restarted == 2
    batch = _unit(z[0])
    for c in (2, 3):  # re-seeded with vectors of this batch
        assert min(float((q.codebook[c] - b).abs().max()) for b in batch) < 1e-6
    # usage after the EMA step: 0.99 * [10, 10, 0.001, 0.001] + 0.01 * counts [2, 1, 0, 0]; the re-seeded
    # codes get its mean
    ema = 0.99 * torch.tensor([10.0, 10.0, 0.001, 0.001]) + 0.01 * torch.tensor([2.0, 1.0, 0.0, 0.0])
    assert torch.allclose(q.usage[:2], ema[:2])
    assert q.usage[2] == pytest.approx(float(ema.mean())) and q.usage[3] == pytest.approx(float(ema.mean()))
    # with the restart off nothing is re-seeded
    q2 = NormEMAQuantizer(4, 3, kmeans_init=False, dead_code_ratio=0.0)
    q2.usage.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))
    before = q2.codebook.clone()
    q2.train()
    q2(torch.tensor([[[1.0, 0.0, 0.0]]]))
    assert q2.last_restarted == 0 and torch.equal(q2.codebook[2:], before[2:])


def test_kmeans_init_on_the_first_training_batch():
    torch.manual_seed(0)
    centres = _unit(torch.randn(4, 8))
    z = (centres.repeat(50, 1) + 0.01 * torch.randn(200, 8)).unsqueeze(0)
    q = NormEMAQuantizer(4, 8, kmeans_init=True, dead_code_ratio=0.0)
    assert not bool(q.initialized)
    q.train()
    _, ids, _ = q(z)
    assert bool(q.initialized)
    # every true centre is matched by one code, and each cluster gets one id
    sim = q.codebook @ centres.t()
    assert (sim.max(0).values > 0.99).all()
    assert len(set(ids[0].tolist())) == 4


# ---------------------------------------------------------------------- tokenizer files
def _tiny_vqkd(**kw):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_depth=1, num_tokens=16,
                code_dim=8, teacher_dim=24)
    args.update(kw)
    return VQKD(**args)


def test_tokenizer_file_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = _tiny_vqkd()
    tok.train()
    x = torch.randn(4, 3, 16, 16)
    tok.encode(x)  # k-means init + one EMA update: the saved codebook is not the initial one
    path = tok.save(tmp_path / "tokenizer.safetensors", technique="vqkd")
    back = load_tokenizer(path)
    tok.eval()
    assert torch.equal(back.tokenize(x), tok.tokenize(x))
    assert back.num_tokens == 16 and back.grid_size == (4, 4)
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    assert torch.equal(back.quantize.codebook, tok.quantize.codebook) and bool(back.quantize.initialized)


def test_tokenizer_trains_against_a_project_encoder_as_teacher(tmp_path):
    from mimbench.encoders import arch_name, save_encoder
    from pretrain import create_model

    torch.manual_seed(0)
    mae = create_model("mae", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2)
    a = mae.encoder_arch()
    teacher = save_encoder(mae.encoder_state_dict(), tmp_path / "t.safetensors", technique="mae",
                           arch=arch_name(a["embed_dim"], a["depth"], a["patch_size"]), **a)
    tok = _tiny_vqkd(teacher=str(teacher), teacher_dim=None)
    assert tok.teacher_dim == 32 and not any(p.requires_grad for p in tok.teacher.parameters())
    opt = torch.optim.AdamW([p for p in tok.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(8, 3, 16, 16)
    tok.train()
    losses = []
    for _ in range(30):
        loss, rec, ids = tok(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(tok.loss_terms["loss_rec"])
    assert rec.shape == (8, 16, 32) and ids.shape == (8, 16)
    assert losses[-1] < 0.5 * losses[0]  # cosine regression of the teacher's patch features is learnt
    assert not tok.teacher.training
    saved = tok.save(tmp_path / "tok.safetensors")
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        assert not any(k.startswith("teacher.") for k in f.keys())
    with pytest.raises(MimbenchError, match="patch grid"):
        _tiny_vqkd(patch_size=8, teacher=str(teacher), teacher_dim=None)


# ---------------------------------------------------------------------- official checkpoint layout
def _official_state_dict(D=32, depth=2, dec_depth=1, code=8, n=16, out=24, img=16, patch=4):
    """Exactly the keys and shapes of an official VQ-KD checkpoint's "model" (modeling_vqkd.VQKD with
    modeling_finetune.VisionTransformer, use_mean_pooling=True -> fc_norm, init_values=0 -> no gamma,
    qkv_bias=True -> q_bias/v_bias) at a small size, plus the teacher/scaling keys a training
    checkpoint also holds."""
    g = img // patch
    sd = {}

    def vit(prefix, in_chans, p, grid, blocks):
        sd[f"{prefix}.cls_token"] = (1, 1, D)
        sd[f"{prefix}.pos_embed"] = (1, grid * grid + 1, D)
        sd[f"{prefix}.patch_embed.proj.weight"] = (D, in_chans, p, p)
        sd[f"{prefix}.patch_embed.proj.bias"] = (D,)
        for i in range(blocks):
            b = f"{prefix}.blocks.{i}"
            for name, shape in [("norm1.weight", (D,)), ("norm1.bias", (D,)), ("attn.q_bias", (D,)),
                                ("attn.v_bias", (D,)), ("attn.qkv.weight", (3 * D, D)), ("attn.proj.weight", (D, D)),
                                ("attn.proj.bias", (D,)), ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                                ("mlp.fc1.weight", (4 * D, D)), ("mlp.fc1.bias", (4 * D,)),
                                ("mlp.fc2.weight", (D, 4 * D)), ("mlp.fc2.bias", (D,))]:
                sd[f"{b}.{name}"] = shape
        sd[f"{prefix}.fc_norm.weight"] = (D,)
        sd[f"{prefix}.fc_norm.bias"] = (D,)

    vit("encoder", 3, patch, g, depth)
    vit("decoder", code, 1, g, dec_depth)
    sd.update({
        "quantize.cluster_size": (n,), "quantize.embedding.weight": (n, code),
        "quantize.embedding.cluster_size": (n,), "quantize.embedding.embed_avg": (n, code),
        "quantize.embedding.initted": (1,),
        "encode_task_layer.0.weight": (D, D), "encode_task_layer.0.bias": (D,),
        "encode_task_layer.2.weight": (code, D), "encode_task_layer.2.bias": (code,),
        "decode_task_layer.0.weight": (D, D), "decode_task_layer.0.bias": (D,),
        "decode_task_layer.2.weight": (out, D), "decode_task_layer.2.bias": (out,),
        "scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1),
        "teacher_model.visual.proj": (D, out),
    })
    torch.manual_seed(1)
    t = {k: torch.randn(s) * 0.05 for k, s in sd.items()}
    t["quantize.embedding.weight"] = _unit(t["quantize.embedding.weight"])
    t["quantize.embedding.initted"] = torch.tensor([1.0])
    t["quantize.cluster_size"] = torch.rand(n)
    return t


def test_official_checkpoint_maps_strictly_and_tokenizes(tmp_path):
    sd = _official_state_dict()
    path = tmp_path / "vqkd.pth"
    torch.save({"model": sd}, path)
    tok = load_tokenizer(path, num_heads=2, decoder_num_heads=2)
    assert tok.config["depth"] == 2 and tok.config["decoder_depth"] == 1 and tok.config["embed_dim"] == 32
    assert tok.num_tokens == 16 and tok.grid_size == (4, 4) and tok.teacher_dim == 24
    assert tok.input_scaling == "imagenet_to_pm1"
    mine = tok.state_dict()
    for k, v in sd.items():
        if k.startswith(("teacher", "scaling")) or k in ("quantize.embedding.cluster_size",
                                                          "quantize.embedding.embed_avg"):
            continue
        name = {"quantize.embedding.weight": "quantize.codebook", "quantize.cluster_size": "quantize.usage",
                "quantize.embedding.initted": "quantize.initialized"}.get(k, k)
        assert torch.equal(mine[name].float(), v.reshape(mine[name].shape).float()), k
    # tokens = nearest code of the l2-normalised task-layer output of fc_norm(patch tokens), computed by hand
    x = torch.randn(2, 3, 16, 16)
    enc = tok.encoder
    xs = (x * torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
          + torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]) * 2 - 1
    feats = enc.fc_norm(enc.forward_features(xs)[:, 1:])
    z = _unit(tok.encode_task_layer(feats))
    want = (z @ sd["quantize.embedding.weight"].t()).argmax(-1)
    assert torch.equal(tok.tokenize(x), want)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({"encoder.head.weight": torch.zeros(3, 32)}), "unexpected keys: encoder.head.weight"),
    (lambda sd: sd.pop("encoder.blocks.1.attn.q_bias"), "missing keys: encoder.blocks.1.attn.q_bias"),
    (lambda sd: sd.update({"encode_task_layer.0.bias": torch.zeros(31)}), "wrong shapes: encode_task_layer.0.bias"),
])
def test_official_mapping_rejects_anything_but_the_exact_layout(edit, match):
    sd = _official_state_dict()
    tok = _tiny_vqkd(embed_dim=32, num_heads=2, decoder_num_heads=2)
    map_official_vqkd(dict(sd), tok)  # the exact layout maps
    edit(sd)
    with pytest.raises(MimbenchError, match=match):
        map_official_vqkd(sd, tok)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "vqkd.pth"
    torch.save({"model": _official_state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(MimbenchError, match="safely"):
        load_tokenizer(path)
    with pytest.raises(MimbenchError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.pth")
