"""BEiT v2 end to end through `mimbench pretrain`'s entry point (tokenizer, then BEiT v2 + DDS, then the
encoder file), and the full-scale configs carry the official recipe."""
import json
import os

import pytest
import torch

from mimbench.config import load_config
from pretrain.main import resolve_batch

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain", "configs")


@pytest.mark.slow
def test_tokenizer_then_beitv2_dds_then_encoder_file(tmp_path):
    from mimbench import load_encoder
    from mimbench.encoders import arch_name, read_metadata, save_encoder
    from pretrain import create_model
    from pretrain.main import run_pretrain
    from pretrain.tokenizer import load_tokenizer

    torch.manual_seed(0)
    mae = create_model("mae", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                       decoder_depth=1, decoder_num_heads=2)
    a = mae.encoder_arch()
    teacher = save_encoder(mae.encoder_state_dict(), tmp_path / "teacher.safetensors", technique="mae",
                           arch=arch_name(a["embed_dim"], a["depth"], a["patch_size"]), **a)
    small = ["data.limit=64", "schedule.epochs=1", "schedule.warmup_epochs=0.5", "optim.batch_size=32",
             "runtime.log_every=1"]
    def smaller(name: str, model: str) -> str:  # the shipped config at a smaller width (inherits via _base_)
        path = tmp_path / name
        path.write_text(f"_base_ = [{os.path.abspath(os.path.join(CONFIGS, name))!r}]\nmodel = dict({model})\n")
        return str(path)

    tok_cfg = smaller("vqkd_tiny_fmnist.py", "embed_dim=32, depth=1, num_heads=2, num_tokens=64")
    tok_path = run_pretrain(tok_cfg, out=tmp_path / "vqkd", overrides=small + [f"model.teacher={teacher}"])
    assert tok_path.name == "tokenizer.safetensors"
    tok = load_tokenizer(tok_path)
    assert tok.num_tokens == 64 and tok.grid_size == (8, 8) and bool(tok.quantize.initialized)
    log = [json.loads(line) for line in (tmp_path / "vqkd" / "log.jsonl").read_text().splitlines()]
    assert {"loss_rec", "loss_quant", "codes_used", "perplexity"} <= set(log[-1]["terms"])

    beit_cfg = smaller("beitv2-dds_tiny_fmnist.py", "embed_dim=32, depth=3, num_heads=2, cls_pt=True, "
                                                    "cls_pt_early_layers=2, cls_pt_head_layers=1")
    enc_path = run_pretrain(beit_cfg, out=tmp_path / "beit", overrides=small + [f"model.tokenizer={tok_path}"])
    meta = read_metadata(enc_path)
    assert meta["family"] == "beit" and meta["technique"] == "beitv2+dds" and meta["use_shared_rel_pos_bias"] == "true"
    assert meta["layer_scale_init_value"] == "0.1" and meta["epochs"] == "1.0"
    log = [json.loads(line) for line in (tmp_path / "beit" / "log.jsonl").read_text().splitlines()]
    assert {"loss_mim", "loss_mim_d1", "loss_mim_d3", "beta_d1", "loss_cls_pt", "mlm_acc"} <= set(log[-1]["terms"])
    encoder = load_encoder(enc_path)
    assert type(encoder).__name__ == "Beit"
    out = encoder.forward_features(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 65, 32) and torch.isfinite(out).all()


def test_full_scale_beitv2_configs_carry_the_official_recipe():
    for epochs, betas, drop_path in ((1600, (0.9, 0.999), 0.1), (300, (0.9, 0.98), 0.0)):
        for prefix, technique in (("beitv2", "beitv2"), ("beitv2-dds", "beitv2+dds")):
            cfg = load_config(os.path.join(CONFIGS, f"{prefix}_vit-b_in1k_{epochs}ep.py"))
            m = cfg.model
            assert cfg.technique == technique and m.name == f"{technique}_vit_base_patch16"
            assert (m.num_mask_patches, m.min_mask_patches_per_block, m.layer_scale_init_value) == (75, 16, 0.1)
            assert m.use_shared_rel_pos_bias and not m.use_abs_pos_emb and not m.use_rel_pos_bias
            assert m.cls_pt and (m.cls_pt_early_layers, m.cls_pt_head_layers) == (9, 2) and m.cls_pt_shared_lm_head
            assert m.drop_path_rate == drop_path and tuple(cfg.optim.betas) == betas
            assert cfg.schedule.epochs == epochs and cfg.schedule.warmup_epochs == 10 and cfg.schedule.min_lr == 1e-5
            _, _, eff = resolve_batch(cfg.optim, 16)
            assert eff == 2048 and cfg.optim.blr * eff / 256 == pytest.approx(1.5e-3)  # the official absolute lr
            assert cfg.optim.clip_grad == 3.0 and cfg.optim.weight_decay == 0.05 and cfg.runtime.mask_ratio is None
    tok = load_config(os.path.join(CONFIGS, "vqkd_vit-b_in1k_100ep.py"))
    _, _, eff = resolve_batch(tok.optim, 8)
    assert eff == 512 and tok.optim.blr * eff / 256 == pytest.approx(5e-5 * 512 / 128)  # the script's scaling
    assert tok.model.name == "vqkd_vit_base_patch16" and tok.schedule.epochs == 100
    assert tuple(tok.optim.betas) == (0.9, 0.99) and tok.optim.weight_decay == 1e-4
