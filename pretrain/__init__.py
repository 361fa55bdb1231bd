"""pretrain: ViT encoders pre-trained by masked image modelling (MAE, robust-MAE recipe, DDAE, BEiT v2, VQ-KD)."""
from pretrain import models  # noqa: F401  (fills the registry)
from pretrain.registry import create_model, list_models, model_spec, register

__all__ = ["create_model", "list_models", "model_spec", "register"]
