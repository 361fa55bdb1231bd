"""What an MAE-family pre-training run's own model does: reconstruction loss by distance to the nearest visible
patch, and how per-patch and population target normalisation scale the targets.

A pre-training run folder (``mimbench pretrain --out DIR``) holds ``config.py`` (the resolved config) and
``checkpoint-latest.pt``; the model is rebuilt from the config (:func:`pretrain.registry.model_spec`,
:func:`pretrain.registry.create_model`) and its weights read with ``weights_only=True``
(:func:`mimbench.engine.load_checkpoint`). Models of the MAE family (:class:`pretrain.models.mae.MaskedAutoencoderViT`
and its subclasses: robust-MAE, MAE+DDS, DDAE) are analysed; others are skipped with the reason.

- **Loss by distance** (the DDAE distance-map story: masked patches far from every visible patch are harder
  to reconstruct): with the run's mask ratio and a mask drawn from the analysis seed, the model's forward
  (eval mode) gives the reconstruction of every patch; each masked patch's loss is the model's own per-patch
  MSE against its (normalised) target (:func:`pretrain.targets.per_patch_mse`), its distance the Euclidean
  distance in patches from its grid cell to the nearest visible one. The record holds the mean loss and the
  patch count per distance bin, the bin being the distance rounded to the nearest integer (1: the 4- and
  8-neighbours, 2: distance 2 or sqrt 5, ...).
- **Target normalisation** (the robust-MAE recipe: per-patch statistics blow low-contrast patches up to unit
  variance; population statistics do not): of the raw patch targets (pixels as the data normalises them,
  :func:`pretrain.targets.patchify`), the population variance (one scalar over every value,
  :func:`pretrain.targets.population_stats`), the mean per-patch variance (:func:`pretrain.targets.patch_stats`),
  their ratio (the share of the pixel variance inside patches) and the factor per-patch normalisation multiplies
  a patch by relative to population normalisation, ``sqrt((pop_var + eps) / (patch_var + eps))`` - its median and
  95th percentile over patches; plus the run's own ``target_norm`` mode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimbench.config import load_config
from mimbench.engine import load_checkpoint
from mimbench.errors import MimbenchError
from pretrain import targets
from pretrain.models.mae import MaskedAutoencoderViT
from pretrain.registry import create_model, model_spec


def load_pretrain_run(run_dir: Path):
    """(model in eval mode with the run's last checkpoint, resolved config) of the pre-training folder ``run_dir``."""
    run_dir = Path(run_dir)
    config, ckpt = run_dir / "config.py", run_dir / "checkpoint-latest.pt"
    if not (config.is_file() and ckpt.is_file()):
        raise MimbenchError(f"{run_dir} is not a pre-training run folder (it needs config.py and "
                            "checkpoint-latest.pt).", "Give --pretrain-run the --out folder of `mimbench pretrain`.")
    cfg = load_config(config, kind="pretrain")
    spec = model_spec(cfg)
    model = create_model(spec.name, **spec.kwargs)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    return model.eval(), cfg


def is_mae_family(model) -> bool:
    """Whether the pre-training model is MAE or one of its subclasses (robust-MAE, MAE+DDS, DDAE)."""
    return isinstance(model, MaskedAutoencoderViT)


def nearest_visible_distance(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """N×L Euclidean distance (in patches) from each patch to the nearest visible one (``mask`` N×L, 1 = masked;
    visible patches get 0). Row-major square grid of side ``grid``."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    dist = torch.cdist(cells, cells)  # L×L
    visible = mask.cpu() < 0.5
    big = torch.where(visible[:, None, :], dist[None], torch.full_like(dist[None], float("inf")))
    return big.min(dim=-1).values


def loss_by_distance(loss: torch.Tensor, mask: torch.Tensor, grid: int) -> dict[str, dict]:
    """Bin (nearest-visible distance rounded to an integer) -> {"loss": mean per-patch loss, "patches": count}
    over the masked patches."""
    dist = nearest_visible_distance(mask, grid)
    masked = mask.cpu() > 0.5
    bins = torch.round(dist[masked]).long()
    values = loss.detach().cpu().float()[masked]
    return {str(int(b)): {"loss": float(values[bins == b].mean()), "patches": int((bins == b).sum())}
            for b in torch.unique(bins).tolist()}


def target_norm_stats(model, images: torch.Tensor) -> dict:
    """Population vs per-patch statistics of the raw patch targets of ``images`` (see the module docstring)."""
    raw = targets.patchify(images.float(), model.patch_size)
    pop_mean, pop_var = targets.population_stats(raw)
    _mean, patch_var = targets.patch_stats(raw)
    patch_var = patch_var.flatten()
    eps = targets.PIXEL_EPS
    gain = torch.sqrt((pop_var + eps) / (patch_var + eps)).numpy()
    return {"mode": model.target_normalizer.mode, "alpha": float(model.target_normalizer.alpha),
            "population_variance": float(pop_var), "mean_patch_variance": float(patch_var.mean()),
            "within_patch_share": float(patch_var.mean() / pop_var) if float(pop_var) > 0 else None,
            "per_patch_gain_median": float(np.median(gain)), "per_patch_gain_p95": float(np.percentile(gain, 95))}


@torch.no_grad()
def pretrain_measures(run_dir: Path, images_at, seed: int, batch_size: int = 64) -> dict:
    """``{"loss_by_distance": ..., "target_norm": ..., "mask_ratio": ..., "technique": ...}`` of the run in
    ``run_dir`` on ``images_at(img_size)`` (N×C×S×S at the run's image size S); MimbenchError (the reason) for a
    model outside the MAE family."""
    model, cfg = load_pretrain_run(run_dir)
    if not is_mae_family(model):
        raise MimbenchError(f"the pre-training model {type(model).__name__} is not of the MAE family (MAE, "
                            "robust-MAE, MAE+DDS, DDAE): it reconstructs no pixels of masked patches",
                            "Give an MAE-family run to --pretrain-run.")
    images = images_at(int(model.img_size))
    ratio = float(cfg.runtime.mask_ratio)
    gen = torch.Generator().manual_seed(int(seed))
    grid = int(model.img_size) // int(model.patch_size)
    losses, masks = [], []
    for start in range(0, images.shape[0], int(batch_size)):
        batch = images[start:start + int(batch_size)].float()
        noise = torch.rand(batch.shape[0], grid * grid, generator=gen)
        _loss, pred, mask = model(batch, ratio, noise)
        losses.append(targets.per_patch_mse(pred.float(), model.forward_target(batch, update=False).float()))
        masks.append(mask)
    loss, mask = torch.cat(losses), torch.cat(masks)
    return {"mask_ratio": ratio, "loss_by_distance": loss_by_distance(loss, mask, grid),
            "target_norm": target_norm_stats(model, images), "technique": str(cfg.technique or model_spec(cfg).technique)}


__all__ = ["is_mae_family", "load_pretrain_run", "loss_by_distance", "nearest_visible_distance",
           "pretrain_measures", "target_norm_stats"]
