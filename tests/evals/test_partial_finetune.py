"""Partial fine-tuning (``finetune.trainable_blocks``, MAE Figure 9): exactly the named parts train, on every family."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from mimbench.config import load_config
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.finetune import build_optimizer, freeze_for_partial_finetune, trainable_parameter_names

DEPTH = 3
TINY = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2,
            global_pool="avg")
#: One tiny model per encoder family (ViT with layer scale and registers, BEiT with its gammas, EVA-02 with
#: SwiGLU and RoPE).
MODELS = {
    "vit": lambda: timm.create_model("vit_base_patch16_224", fc_norm=True, init_values=1e-5, reg_tokens=2, **TINY),
    "beit": lambda: timm.create_model("beit_base_patch16_224", init_values=0.1, **TINY),
    "eva": lambda: timm.create_model("eva02_tiny_patch14_224", **TINY),
}
#: The stem: what never trains in partial fine-tuning.
STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed.")
#: The MLP half of a block (MAE: "the last block's MLP and its norm"), with the MLP branch's layer scale.
MLP_PARTS = ("norm2.", "mlp.", "ls2.", "gamma_2")


def expected(names: list[str], blocks) -> set[str]:
    """Names that should train: the final norm and head, and the block parameters of ``blocks``
    (a set of block indices, or "mlp" for the last block's MLP half)."""
    keep = {n for n in names if n.startswith(("fc_norm.", "head.", "norm."))}
    for n in names:
        if not n.startswith("blocks."):
            continue
        index, part = int(n.split(".")[1]), n.split(".", 2)[2]
        if blocks == "mlp":
            if index == DEPTH - 1 and part.startswith(MLP_PARTS):
                keep.add(n)
        elif index in blocks:
            keep.add(n)
    return keep


CASES = [(0, set()), ("mlp", "mlp"), (1, {2}), (2, {1, 2}), (3, {0, 1, 2})]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("trainable, blocks", CASES)
def test_trainable_blocks_freeze_exactly_what_they_say(family, trainable, blocks):
    torch.manual_seed(0)
    model = MODELS[family]()
    names = [n for n, _ in model.named_parameters()]
    want = expected(names, blocks)
    assert any(n.startswith("head.") for n in want) and any(n.startswith(STEM) for n in names)
    info = freeze_for_partial_finetune(model, trainable)
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == want
    assert not any(n.startswith(STEM) for n in grads)
    params = dict(model.named_parameters())
    assert info == {"trainable_blocks": trainable, "trained_params": sum(params[n].numel() for n in want),
                    "total_params": sum(p.numel() for p in params.values())}
    if blocks == "mlp":  # the attention of the last block stays frozen, its MLP half trains
        assert f"blocks.{DEPTH - 1}.attn.proj.weight" not in grads
        assert f"blocks.{DEPTH - 1}.mlp.fc2.weight" in grads or f"blocks.{DEPTH - 1}.mlp.w3.weight" in grads
        assert any(n.startswith(f"blocks.{DEPTH - 1}.norm2.") for n in grads)

    # the optimizer holds the trained parameters and nothing else; one step leaves every frozen one unchanged
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05, layer_decay=0.75, fast=False)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(params[n]) for n in want}
    before = {n: p.detach().clone() for n, p in params.items()}
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    for n, p in params.items():
        if n in want:
            assert p.grad is not None, n
        else:
            assert torch.equal(p, before[n]), f"{n} changed though frozen"
            assert p.grad is None, n
    assert not torch.equal(params["head.weight"], before["head.weight"])


def test_layer_decay_keeps_the_full_models_numbering_over_what_trains():
    """The last block's lr scale under K=1 is the one it has in full fine-tuning (decay ** 1; the head 1)."""
    model = MODELS["vit"]()
    freeze_for_partial_finetune(model, 1)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, fast=False)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scales[f"blocks.{DEPTH - 1}.attn.qkv.weight"] == pytest.approx(0.5)
    assert scales["head.weight"] == pytest.approx(1.0)


def test_all_trains_everything_and_bad_values_are_refused(tmp_path):
    model = MODELS["beit"]()
    assert trainable_parameter_names(model, "all") == [n for n, _ in model.named_parameters()]
    for bad in (DEPTH + 1, -1, "half", True):
        with pytest.raises(MimbenchError, match="trainable_blocks"):
            trainable_parameter_names(model, bad)
    for bad in ("half", -1, True, 1.5):
        with pytest.raises(MimbenchError, match="finetune.trainable_blocks"):
            load_config("eval_configs/demo/finetune_fmnist.py", [f"finetune.trainable_blocks={bad!r}"],
                        kind="finetune")
    assert load_config("eval_configs/demo/finetune_fmnist.py", kind="finetune").finetune.trainable_blocks == "all"
    assert load_config("eval_configs/demo/finetune_fmnist.py", ["finetune.trainable_blocks=mlp"],
                       kind="finetune").finetune.trainable_blocks == "mlp"


def test_partial_finetune_run_records_it_and_keeps_the_frozen_weights(tiny_encoder, tmp_path):
    record = run_eval("finetune", encoder=tiny_encoder, config="eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=32", "data.limit_val=16", "optim.batch_size=16",
                                 "finetune.trainable_blocks=1"])
    proto = record["protocol"]
    assert proto["trainable_blocks"] == 1
    assert 0 < proto["trained_params"] < proto["total_params"]
    # embed 32, MLP 128, depth 2: block 1 (12,704 parameters) + fc_norm (64) + head (10 classes: 330)
    block = 4 * 32 * 32 + 4 * 32 + 2 * 32 * 128 + 128 + 32 + 4 * 32
    assert proto["trained_params"] == block + 2 * 32 + 10 * 32 + 10
    state = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)["model"]
    source = load_file(str(tiny_encoder))
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        assert torch.equal(state[name], source[name]), name
    assert not torch.equal(state["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    with pytest.raises(MimbenchError, match="2-block encoder"):
        run_eval("finetune", encoder=tiny_encoder, config="eval_configs/demo/finetune_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "bad", overrides=["finetune.trainable_blocks=3"])
