"""Attention read from timm's own attention modules: mean attention distance and attention entropy per head.

The attention probabilities are not stored by timm (its blocks run the fused ``scaled_dot_product_attention``
kernel when it is available), so a forward hook on each block's attention module recomputes them from that
module's own inputs and weights: ``softmax(q k^T * scale + bias)`` with ``q`` and ``k`` from the module's
``qkv`` projection (or its separate q/k projections), its q/k norms, and its position terms - BEiT's relative
position bias (its own table and the model's shared one), Eva's rotary embedding (rope) on the patch tokens.
The hook reduces the probabilities of a batch to per-head sums at once, so neither a copy of the model nor the
attention maps of more than one block and batch are held. Readable modules (:data:`READERS`): the ViT family's
``timm.layers.Attention`` (``timm.models.vision_transformer.Attention``), ``timm.models.beit.Attention`` and
``timm.models.eva.EvaAttention``; any other attention module is refused with :class:`AttentionUnreadable`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention as VitAttention
from timm.layers import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention

from mimbench.errors import MimbenchError

#: Queries per forward pass of :func:`attention_measures` (bounds the memory of one block's attention maps).
ATTENTION_BATCH = 64


class AttentionUnreadable(MimbenchError):
    """The encoder's attention cannot be recomputed from its modules (an attention class not in :data:`READERS`,
    or a token count that is not the patch grid); ``problem`` says why."""


def _split_heads(attn, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each B×H×N×d, of a fused ``qkv`` output B×N×3Hd."""
    b, n, _ = qkv.shape
    q, k, _v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k


def _biased_qkv(attn, x: torch.Tensor) -> torch.Tensor:
    """The fused projection of BEiT and Eva: ``qkv`` without bias, plus (q_bias, zero k bias, v_bias)."""
    if attn.q_bias is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def _mask_bias(logits: torch.Tensor, mask) -> torch.Tensor:
    """``logits`` with an attention mask applied as the module applies it (boolean: False = not attended)."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def _vit_logits(attn, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    q, k = _split_heads(attn, attn.qkv(x))
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return _mask_bias(logits, kwargs.get("attn_mask", args[1] if len(args) > 1 else None))


def _beit_logits(attn, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    q, k = _split_heads(attn, _biased_qkv(attn, x))
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    if attn.relative_position_bias_table is not None:
        logits = logits + attn._get_rel_pos_bias().float()
    shared = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
    return logits if shared is None else logits + shared.float()


def _eva_logits(attn, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    if attn.qkv is not None:
        q, k = _split_heads(attn, _biased_qkv(attn, x))
    else:
        b, n, _ = x.shape
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = kwargs.get("rope", args[1] if len(args) > 1 else None)
    if rope is not None:  # rotary embedding of the patch tokens, prefix tokens (class, registers) untouched
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return _mask_bias(logits, kwargs.get("attn_mask"))


#: Attention module class -> the function recomputing its pre-softmax logits (B×H×N×N, float32) from the
#: module, its input ``x`` and the other arguments of its call.
READERS = {VitAttention: _vit_logits, BeitAttention: _beit_logits, EvaAttention: _eva_logits}


def _unreadable(attn) -> AttentionUnreadable:
    return AttentionUnreadable(
        f"the attention of {type(attn).__module__}.{type(attn).__name__} cannot be read (only timm's ViT, BEiT "
        "and Eva attention modules are: their weights give the probabilities a fused kernel does not expose)",
        "Analyse an encoder of the ViT, BEiT or Eva family; the measures that need no attention still run.")


def attention_logits(attn: torch.nn.Module, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None):
    """Pre-softmax attention logits B×H×N×N (float32) of the attention module ``attn`` on its input ``x``."""
    reader = READERS.get(type(attn))
    if reader is None:
        raise _unreadable(attn)
    return reader(attn, x, tuple(args), dict(kwargs or {}))


def patch_geometry(model: torch.nn.Module) -> torch.Tensor:
    """L×L Euclidean distances in pixels between the centres of the model's patches (row-major grid order)."""
    gh, gw = (int(v) for v in model.patch_embed.grid_size)
    ph, pw = (int(v) for v in model.patch_embed.patch_size)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) * ph, (cols.flatten() + 0.5) * pw], dim=1).double()
    return torch.cdist(centres, centres).float()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention module of each block of ``model``; :class:`AttentionUnreadable` when one cannot be read."""
    mods = [getattr(block, "attn", None) for block in getattr(model, "blocks", ())]
    if not mods:
        raise AttentionUnreadable("the encoder has no blocks with an attention module ('blocks[i].attn')",
                                  "Analyse a timm ViT, BEiT or Eva encoder.")
    for mod in mods:
        if type(mod) not in READERS:
            raise _unreadable(mod)
    return mods


@dataclass
class _Sums:
    """Per-block, per-head sums over queries and images: distance (pixels), entropy (nats), and the count."""

    distance: torch.Tensor
    entropy: torch.Tensor
    queries: int = 0


def patch_attention(probs: torch.Tensor, prefix: int) -> torch.Tensor:
    """Probabilities B×H×L×L of patch queries over patch keys: the rows of the patch tokens (those after the
    ``prefix`` class and register tokens), prefix keys dropped, each row renormalised to sum to 1."""
    patch = probs[:, :, prefix:, prefix:]
    return patch / patch.sum(dim=-1, keepdim=True)


def query_measures(probs: torch.Tensor, distances: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, entropy), each B×H×L: for every patch query of the attention probabilities ``probs`` (B×H×N×N,
    softmax over all N tokens, the first ``prefix`` of them class and register tokens), the attention-weighted
    mean distance (units of ``distances``, L×L between patches) and the entropy (nats) of its attention over the
    patch keys, renormalised (:func:`patch_attention`)."""
    attn = patch_attention(probs, prefix)
    if attn.shape[-1] != distances.shape[0]:
        raise AttentionUnreadable(f"the attention covers {attn.shape[-1]} patch tokens, but the patch grid has "
                                  f"{distances.shape[0]}", "Give images of the encoder's image size.")
    return (attn * distances.to(attn.device, attn.dtype)).sum(dim=-1), -torch.special.xlogy(attn, attn).sum(dim=-1)


def _reduce(sums: _Sums, distances: torch.Tensor, prefix: int, block: int, logits: torch.Tensor) -> None:
    distance, entropy = query_measures(logits.softmax(dim=-1), distances, prefix)
    sums.distance[block] += distance.sum(dim=(0, 2)).cpu().double()
    sums.entropy[block] += entropy.sum(dim=(0, 2)).cpu().double()
    if block == 0:
        sums.queries += distance.shape[0] * distance.shape[2]


def _hook(sums: _Sums, distances: torch.Tensor, prefix: int, block: int, module, args, kwargs, output):
    with torch.autocast(args[0].device.type, enabled=False):
        logits = attention_logits(module, args[0], args, kwargs)
    _reduce(sums, distances, prefix, block, logits)


@torch.no_grad()
def attention_measures(encoder: torch.nn.Module, images: torch.Tensor,
                       batch_size: int = ATTENTION_BATCH) -> dict[str, torch.Tensor]:
    """``{"distance": depth×heads (pixels), "entropy": depth×heads (nats)}`` of ``encoder`` on ``images``
    (N×C×H×W, preprocessed, at the encoder's image size), from one forward pass per ``batch_size`` images; see
    :func:`attention_distance` and :func:`attention_entropy` for the definitions."""
    mods = attention_modules(encoder)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    heads = int(mods[0].num_heads)
    sums = _Sums(torch.zeros(len(mods), heads, dtype=torch.float64), torch.zeros(len(mods), heads, dtype=torch.float64))
    distances = patch_geometry(encoder)
    handles = [m.register_forward_hook(partial(_hook, sums, distances, prefix, i), with_kwargs=True)
               for i, m in enumerate(mods)]
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    try:
        for start in range(0, images.shape[0], int(batch_size)):
            encoder.forward_features(images[start:start + int(batch_size)].to(device))
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    if sums.queries == 0:
        raise MimbenchError("No images to measure attention on.", "Give at least one image.")
    return {"distance": (sums.distance / sums.queries).float(), "entropy": (sums.entropy / sums.queries).float()}


def attention_distance(encoder: torch.nn.Module, images: torch.Tensor,
                       batch_size: int = ATTENTION_BATCH) -> torch.Tensor:
    """Mean attention distance in pixels, a tensor of shape (depth, heads).

    For block ``b``, head ``h``, image ``n`` and patch query ``i`` (patch tokens only: the class token and
    register tokens - the model's ``num_prefix_tokens`` leading tokens - are neither queries nor keys), with
    ``a_ij`` the attention probability of patch key ``j`` (softmax over all tokens, as the model computes it)::

        a'_ij = a_ij / sum_{j' patch} a_ij'            (keys restricted to patch tokens, renormalised)
        d_i   = sum_{j patch} a'_ij * ||c_i - c_j||_2  (c: patch centre in pixels, (row + 0.5) * patch height,
                                                        (column + 0.5) * patch width)
        distance[b, h] = mean over images n and patch queries i of d_i

    the "mean attention distance" of Dosovitskiy et al. (ViT, ICLR 2021, Fig. 7) as Xie et al. ("Revealing the
    dark secrets of MIM", CVPR 2023) measure it for MIM encoders. ``encoder``: a timm ViT, BEiT or Eva model
    (:func:`mimbench.encoders.load_encoder`); ``images``: N×C×H×W preprocessed images at its image size, run
    ``batch_size`` at a time through ``forward_features`` in eval mode. The probabilities are recomputed in
    float32 by hooks on the attention modules (:func:`attention_logits`); :class:`AttentionUnreadable` when the
    encoder's attention modules cannot be read.
    """
    return attention_measures(encoder, images, batch_size)["distance"]


def attention_entropy(encoder: torch.nn.Module, images: torch.Tensor,
                      batch_size: int = ATTENTION_BATCH) -> torch.Tensor:
    """Mean attention entropy in nats, a tensor of shape (depth, heads).

    Over the same token set as :func:`attention_distance` (patch queries, patch keys renormalised):
    ``H_i = -sum_{j patch} a'_ij * log a'_ij`` (0 log 0 = 0), averaged over images and patch queries per block and
    head (Xie et al., CVPR 2023; Park et al., ICLR 2023). log(L) for L patches is uniform attention, 0 attention
    on one patch.
    """
    return attention_measures(encoder, images, batch_size)["entropy"]


__all__ = ["ATTENTION_BATCH", "AttentionUnreadable", "READERS", "attention_distance", "attention_entropy",
           "attention_logits", "attention_measures", "attention_modules", "patch_attention", "patch_geometry",
           "query_measures"]
