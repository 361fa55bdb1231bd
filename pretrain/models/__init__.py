"""Pre-training model families; each module registers its builders with :func:`pretrain.registry.register`."""
