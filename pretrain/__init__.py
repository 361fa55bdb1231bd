"""pretrain: ViT encoders pre-trained by masked image modelling (MAE, robust-MAE recipe, DDAE)."""
from pretrain.registry import create_model, list_models, register

__all__ = ["create_model", "list_models", "register"]
