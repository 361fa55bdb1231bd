"""Encoder files (safetensors + metadata), loading them as timm ViTs, converting foreign checkpoints."""
from mimbench.encoders.convert import convert_checkpoint
from mimbench.encoders.format import (
    FORMAT_TAG,
    REQUIRED_METADATA,
    STANDARD_VITS,
    arch_name,
    check_encoder_file,
    describe_encoder,
    encoder_sha256,
    load_encoder,
    read_metadata,
    save_encoder,
)

__all__ = [
    "FORMAT_TAG", "REQUIRED_METADATA", "STANDARD_VITS", "arch_name", "check_encoder_file", "convert_checkpoint", "describe_encoder",
    "encoder_sha256", "load_encoder", "read_metadata", "save_encoder",
]
