"""pretrain: ViT encoders pre-trained by masked image modelling (MAE, robust-MAE recipe, DDAE)."""
