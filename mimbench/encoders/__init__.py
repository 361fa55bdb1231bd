"""Encoder files (safetensors + metadata), loading them as timm models, reading foreign checkpoints."""
from mimbench.encoders.convert import LAYOUTS, convert_checkpoint, convert_state, detect_layouts
from mimbench.encoders.format import (
    FAMILIES,
    FORMAT_TAG,
    REQUIRED_METADATA,
    STANDARD_VITS,
    arch_name,
    check_encoder_file,
    declare_layout,
    describe_encoder,
    encoder_family,
    encoder_sha256,
    is_encoder_file,
    load_encoder,
    open_encoder,
    read_metadata,
    save_encoder,
)
from mimbench.encoders.resample import resample_pos_embed, resize_rel_pos_table

__all__ = [
    "FAMILIES", "FORMAT_TAG", "LAYOUTS", "REQUIRED_METADATA", "STANDARD_VITS", "arch_name", "check_encoder_file",
    "convert_checkpoint", "convert_state", "declare_layout", "describe_encoder", "detect_layouts", "encoder_family",
    "encoder_sha256", "is_encoder_file", "load_encoder", "open_encoder", "read_metadata", "resample_pos_embed",
    "resize_rel_pos_table", "save_encoder",
]
