"""Pre-training model families; importing this package registers every one of them
(:func:`pretrain.registry.register`). A new family is a module here plus its line below."""
from pretrain.models import beitv2, ddae, mae, vqkd  # noqa: F401  (registration)
