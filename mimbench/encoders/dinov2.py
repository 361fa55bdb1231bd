"""DINOv2 (with and without registers) and Hugging Face ViT-style state dicts as ViT-family encoder tensors.

Official layout (facebookresearch/dinov2 ``models/vision_transformer.py``; the torch.hub state dicts):
``cls_token`` (1,1,D), ``register_tokens`` (1,R,D) in the register models, ``pos_embed`` (1,1+N,D) with
a class slot, ``mask_token`` (training only: dropped), ``patch_embed.proj``, blocks
``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`` (training
checkpoints with ``block_chunks`` name them ``blocks.c.i.*``), ``norm``. The registers are inserted
after the class token once the position embedding is added, so they carry no position; timm stores such
a model with ``no_embed_class`` and the class position folded into ``cls_token`` (timm
``vision_transformer._convert_dinov2``), which computes the same and is what the encoder file holds.
timm's ``vit_*_dinov2`` / ``vit_*_reg4_dinov2`` state dicts are already in that layout.

Resampling: ``pos_resample="dinov2"`` (offset 0.1, no antialias) for the models without registers,
``"dinov2-reg"`` (offset 0, antialias) for those with (the hub's ``interpolate_offset`` /
``interpolate_antialias``). Pooling: the class token after the final norm (DINOv2's linear and k-NN
evaluations). Layer-scale init 1e-5 is recorded (timm's value; the stored gammas are what count). The
giant model's SwiGLU MLP (official ``SwiGLUFFNFused``: ``mlp.w12`` (2h, D) with the gate first, ``mlp.w3``
(D, h), h = ceil8(int(4D * 2/3)); timm ``vit_giant_patch14_dinov2``: ``mlp.fc1/fc2`` of those shapes;
HF ``use_swiglu_ffn``: ``mlp.weights_in/weights_out``) becomes ``mlp.fc1/fc2`` with ``swiglu_mlp=true``
(:mod:`mimbench.encoders.vit`); a file where only some blocks have it is refused.

Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (and, in :mod:`mimbench.encoders.ijepa`,
``IJepaModel``) keys are mapped here too, both the names ``save_pretrained`` writes
(``encoder.layer.i.attention.attention.query``, ``attention.output.dense``, ``layer_scale1.lambda1``,
``intermediate.dense`` ...) and the in-memory names of transformers 5 (``attention.q_proj`` ...); the
separate q/k/v projections become timm's fused ``attn.qkv``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from mimbench.encoders.arch import arch_name, mlp_hidden, parse_arch
from mimbench.encoders.file import check_tensors, encoder_metadata
from mimbench.encoders.vit import vit_metadata
from mimbench.errors import MimbenchError

#: DINOv2's layer-scale initial value as timm records it (``vit_*_dinov2``: ``init_values=1e-5``).
DINOV2_INIT_VALUES = 1e-5
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SWIGLU = re.compile(r"^blocks\.\d+\.mlp\.(w12|w3)\.")


def is_official_dinov2(keys) -> bool:
    """Official DINOv2 keys: register tokens, or a mask token next to layer-scale gammas."""
    keys = list(keys)
    return "register_tokens" in keys or ("mask_token" in keys and any(k.endswith("ls1.gamma") for k in keys))


def is_timm_dinov2(sd: Mapping[str, torch.Tensor]) -> bool:
    """timm's ``vit_*_dinov2`` / ``vit_*_reg4_dinov2`` state dict: layer scale, patch 14, a class token, and either
    registers or a class slot in ``pos_embed`` (DeiT-3's patch-14 model has neither)."""
    w, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    if w is None or pos is None or w.ndim != 4 or int(w.shape[-1]) != 14 or "cls_token" not in sd:
        return False
    if not any(k.endswith("ls1.gamma") for k in sd):
        return False
    n = int(pos.shape[1])
    return "reg_token" in sd or int((n - 1) ** 0.5) ** 2 == n - 1


def swiglu_width(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """DINOv2's SwiGLU hidden width h (``SwiGLUFFNFused``; HF ``Dinov2SwiGLUFFN``): int(D * ratio * 2/3) rounded
    up to a multiple of 8 (4096 for the giant model, D = 1536)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _swiglu_flag(out: Mapping[str, torch.Tensor], where: str) -> bool:
    """Whether the blocks' MLP is SwiGLU (packed ``fc1`` twice ``fc2``'s input width), the same in every block."""
    kinds = {}
    for k, w in out.items():
        if (m := re.match(r"^blocks\.(\d+)\.mlp\.fc1\.weight$", k)):
            fc2 = out.get(f"blocks.{m.group(1)}.mlp.fc2.weight")
            kinds[m.group(1)] = fc2 is not None and int(w.shape[0]) == 2 * int(fc2.shape[1])
    if len(set(kinds.values())) > 1 or any(_SWIGLU.match(k) for k in out):
        raise MimbenchError(f"{where}: a SwiGLU MLP (DINOv2 giant's mlp.w12/w3) in some blocks only, or with one "
                            "of its two weights missing.", "Give the complete state dict of one DINOv2 model.")
    return any(kinds.values())


def dinov2_to_timm(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """``(timm tensors, ViT flags, dropped names)`` of an official or timm DINOv2 state dict."""
    unchunked = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    dropped = [k for k in unchunked if k == "mask_token"]
    packed = {m.group(1) for k in unchunked if (m := re.match(r"^blocks\.(\d+)\.mlp\.w12\.weight$", k))
              and f"blocks.{m.group(1)}.mlp.w3.weight" in unchunked}
    out = {}
    for k, v in unchunked.items():
        m = re.match(r"^blocks\.(\d+)\.mlp\.", k)
        if m and m.group(1) in packed:  # official SwiGLUFFNFused -> timm's packed SwiGLU names
            k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        if k != "mask_token":
            out[k] = v
    flags = {"class_token": True, "init_values": DINOV2_INIT_VALUES, "pos_resample": "dinov2", "global_pool": "token",
             "swiglu_mlp": _swiglu_flag(out, where)}
    if "register_tokens" in out:  # official register model -> timm's no_embed_class layout
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    if "reg_token" in out:
        flags.update(reg_tokens=int(out["reg_token"].shape[1]), no_embed_class=True, pos_resample="dinov2-reg")
    if not any(k.endswith("ls1.gamma") for k in out):
        flags["init_values"] = None
    return out, flags, dropped


# ------------------------------------------------------------------ Hugging Face
_HF_BLOCK = re.compile(r"^(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)$")
#: HF module path inside a block (saved names, then transformers 5 in-memory names) -> timm's.
_HF_MODULES = {
    "norm1": "norm1", "layernorm_before": "norm1", "norm2": "norm2", "layernorm_after": "norm2",
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1", "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
    # use_swiglu_ffn: saved as weights_in (gate, then value) / weights_out; in memory gate_proj, up_proj, down_proj
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.fc2",
}
_HF_EMBED = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "embeddings.register_tokens": "register_tokens",
             "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_DROP = ("embeddings.mask_token", "pooler.")
_HF_PREFIXES = ("dinov2.", "dinov2_with_registers.", "ijepa.", "model.")


def _hf_block_key(i: str, rest: str) -> str | None:
    for scale in ("1", "2"):
        if rest == f"layer_scale{scale}.lambda1":
            return f"blocks.{i}.ls{scale}.gamma"
    module, _, param = rest.rpartition(".")
    target = _HF_MODULES.get(module)
    return None if target is None else f"blocks.{i}.{target}.{param}"


def _hf_unprefixed(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in _HF_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def hf_dropped(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names :func:`hf_to_timm` leaves out of ``state`` on purpose (``mask_token``, ``pooler``)."""
    return [k for k in _hf_unprefixed(state) if k.startswith(_HF_DROP)]


def hf_to_timm(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(timm-named tensors, dropped names)`` of an HF ViT-style state dict; q/k/v fused into ``attn.qkv``.

    Official-style ``register_tokens`` are kept under that name (:func:`dinov2_to_timm` folds them)."""
    state = _hf_unprefixed(state)
    out, dropped, unknown = {}, [], []
    for k, v in state.items():
        m = _HF_BLOCK.match(k)
        name = _hf_block_key(*m.groups()) if m else _HF_EMBED.get(k)
        if name is not None:
            out[name] = v
        elif k.startswith(_HF_DROP):
            dropped.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise MimbenchError(f"{where}: tensors with no place in a ViT encoder: {', '.join(sorted(unknown)[:6])}.",
                            "Give the weights of a Dinov2Model, Dinov2WithRegistersModel or IJepaModel.")
    for i in sorted({int(m.group(1)) for k in out if (m := re.match(r"blocks\.(\d+)\.q\.", k))}):
        for param in ("weight", "bias"):
            parts = [out.pop(f"blocks.{i}.{p}.{param}", None) for p in "qkv"]
            if any(p is None for p in parts):
                raise MimbenchError(f"{where}: block {i} lacks one of its query/key/value {param}s.",
                                    "The weights are incomplete; save the model again.")
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    for key in [k for k in out if re.match(r"blocks\.\d+\.mlp\.gate\.", k)]:  # timm's packed fc1: gate first
        up = out.pop(key.replace(".mlp.gate.", ".mlp.up."), None)
        if up is None:
            raise MimbenchError(f"{where}: {key} has no up_proj beside it.", "The weights are incomplete; save the "
                                "model again.")
        out[key.replace(".mlp.gate.", ".mlp.fc1.")] = torch.cat([out.pop(key), up], dim=0)
    return out, dropped


def _config_value(config: Mapping, key: str, where: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise MimbenchError(f"{where}: config.json has no {key!r}.", "Give the config.json saved with the model.")
    return value


def hf_config_arch(config: Mapping, where: str, mlp_width: int | None = None) -> dict:
    """Architecture fields (parse_arch names) and LayerNorm eps of an HF ViT-style config, checked."""
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise MimbenchError(f"{where}: hidden_act={config.get('hidden_act')!r}, qkv_bias={config.get('qkv_bias')!r}: "
                            "the ViT family has an exact-GELU MLP and qkv bias.", "Use a model with both.")
    d = int(_config_value(config, "hidden_size", where))
    hidden = mlp_width if mlp_width is not None else mlp_hidden(d, float(_config_value(config, "mlp_ratio", where)))
    if config.get("use_swiglu_ffn") and mlp_width is None:  # timm's packed fc1 width: gate and value, 2h
        hidden = 2 * swiglu_width(d, float(_config_value(config, "mlp_ratio", where)))
    ratio = hidden / d if mlp_hidden(d, hidden / d) == hidden else (hidden + 0.5) / d
    patch = _config_value(config, "patch_size", where)
    size = _config_value(config, "image_size", where)
    patch, size = (int(p[0]) if isinstance(p, (list, tuple)) else int(p) for p in (patch, size))
    return dict(img_size=size, patch_size=patch, embed_dim=d, depth=int(_config_value(config, "num_hidden_layers", where)),
                num_heads=int(_config_value(config, "num_attention_heads", where)), mlp_ratio=ratio,
                norm_eps=float(config.get("layer_norm_eps", 1e-6)))


def hf_encoder(tensors: dict[str, torch.Tensor], arch: dict, flags: dict, *, technique: str, layout: str,
               dropped: list[str], config: Mapping, where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an HF model mapped to the timm layout, checked against its config."""
    arch = dict(arch)
    eps = arch.pop("norm_eps")
    counts: dict[str, int] = {}
    for k in dropped:  # per module, as convert's source_dropped: "embeddings.mask_token(1)"
        top = k if k.startswith("embeddings.") else k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    extra = vit_metadata(flags) | {"source_layout": layout, "source_config": "config.json",
                                   "source_dropped": ",".join(f"{k}({n})" for k, n in sorted(counts.items()))}
    if eps != 1e-6:
        extra["norm_eps"] = repr(eps)
    meta = encoder_metadata(arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]),
                            technique=technique, source=str(config.get("_name_or_path") or "hf"),
                            extra=extra, where=where, **arch)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parse_arch(meta, where),
                  f"{where} (its config.json)")
    return tensors, meta


def _hf_dinov2(state, config, layout: str, where: str):
    tensors, dropped = hf_to_timm(state, where)
    tensors, flags, more = dinov2_to_timm(tensors, where)
    if flags["swiglu_mlp"] != bool(config.get("use_swiglu_ffn", False)):
        raise MimbenchError(f"{where}: config.json says use_swiglu_ffn={config.get('use_swiglu_ffn', False)!r} but the "
                            f"weights hold a {'SwiGLU' if flags['swiglu_mlp'] else 'GELU'} MLP.",
                            "Give the config.json saved with these weights.")
    arch = hf_config_arch(config, where)
    return hf_encoder(tensors, arch, flags, technique="dinov2", layout=layout, dropped=dropped + more,
                      config=config, where=where)


def hf_dinov2_state(state: Mapping[str, torch.Tensor], config: Mapping,
                    where: str = "Dinov2Model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An HF ``Dinov2Model`` state dict + its ``config.json`` dict -> ``(encoder tensors, metadata)``.

    Layer scale (``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``), class-token pooling, DINOv2's
    resampling with offset 0.1; eps from the config (1e-6). The config is the source of truth: tensors
    whose shapes disagree with it are an error.
    """
    if int(config.get("num_register_tokens", 0) or 0):
        return hf_dinov2_registers_state(state, config, where)
    return _hf_dinov2(state, config, "hf-dinov2", where)


def hf_dinov2_registers_state(state: Mapping[str, torch.Tensor], config: Mapping,
                              where: str = "Dinov2WithRegistersModel") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An HF ``Dinov2WithRegistersModel`` state dict + config -> ``(encoder tensors, metadata)``: the registers
    become timm's ``reg_token`` (no position), the class position is folded into ``cls_token``
    (``no_embed_class``), resampling with antialias and no offset."""
    registers = int(_config_value(config, "num_register_tokens", where))
    tensors, meta = _hf_dinov2(state, config, "hf-dinov2-registers", where)
    if int(meta.get("reg_tokens", 0)) != registers:
        raise MimbenchError(f"{where}: config.json says {registers} register tokens, the weights hold "
                            f"{meta.get('reg_tokens', 0)}.", "Give the config.json saved with these weights.")
    return tensors, meta
