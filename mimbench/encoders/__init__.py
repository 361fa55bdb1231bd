"""Encoder files (safetensors + metadata), loading them as timm models, reading foreign checkpoints.

Modules: :mod:`~mimbench.encoders.arch` (architecture fields and names), :mod:`~mimbench.encoders.families`
(the family table; :mod:`~mimbench.encoders.vit`, :mod:`~mimbench.encoders.beit`: one module per family),
:mod:`~mimbench.encoders.file` (the encoder file format), :mod:`~mimbench.encoders.convert` (checkpoint
layouts, their detection and conversion), :mod:`~mimbench.encoders.load` (encoders as timm models),
:mod:`~mimbench.encoders.resample` (position information at another input size).
"""
from mimbench.encoders.arch import STANDARD_VITS, arch_name
from mimbench.encoders.convert import LAYOUTS, check_layout, convert_checkpoint, convert_state, detect_layouts
from mimbench.encoders.families import FAMILIES, FAMILY_TABLE, Family, encoder_family, family_of, family_of_model
from mimbench.encoders.file import (
    FORMAT_TAG, REQUIRED_METADATA, check_encoder_file, encoder_sha256, is_encoder_file, save_encoder,
)
from mimbench.encoders.load import describe_encoder, load_encoder, open_encoder, read_metadata
from mimbench.encoders.resample import resample_pos_embed, resize_rel_pos_table

__all__ = [
    "FAMILIES", "FAMILY_TABLE", "FORMAT_TAG", "Family", "LAYOUTS", "REQUIRED_METADATA", "STANDARD_VITS", "arch_name",
    "check_encoder_file", "check_layout", "convert_checkpoint", "convert_state", "describe_encoder",
    "detect_layouts", "encoder_family", "encoder_sha256", "family_of", "family_of_model", "is_encoder_file",
    "load_encoder", "open_encoder", "read_metadata", "resample_pos_embed", "resize_rel_pos_table", "save_encoder",
]
