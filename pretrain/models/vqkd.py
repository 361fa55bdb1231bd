"""Registry entries of the VQ-KD visual tokenizer (:mod:`pretrain.tokenizer`), so that
``mimbench pretrain`` trains one from a config like any other model."""
from __future__ import annotations

from pretrain.registry import register
from pretrain.tokenizer import VQKD

PRESETS = {
    # BEiT v2's vqkd_encoder_base_decoder_3x768x12: ViT-B/16 encoder, 3-block decoder, 8192 x 32 codes.
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                             decoder_depth=3, num_tokens=8192, code_dim=32),
    # Demo scale for the embedded 32x32 data: the pre-training models' 8x8 grid, 512 codes.
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                               decoder_depth=1, num_tokens=512, code_dim=32),
    # The micro size (the demo's encoders): half the width, same grid and codebook.
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                decoder_depth=1, num_tokens=512, code_dim=32),
}


@register("vqkd")
def vqkd(**kwargs) -> VQKD:
    """VQ-KD tokenizer from explicit constructor arguments (``teacher=<encoder file>`` to train)."""
    return VQKD(**kwargs)


def _register_presets() -> None:
    for name, preset in PRESETS.items():
        register("vqkd_" + name)(lambda _p=preset, **kw: VQKD(**{**_p, **kw}))


_register_presets()
