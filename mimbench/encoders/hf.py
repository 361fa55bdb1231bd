"""Hugging Face model folders (``save_pretrained``) -> encoder tensors + metadata, and back.

What is read: a folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with
``torch.load(weights_only=True)``: a file that needs code is refused, nothing is executed), or such a
weights file alone (the architecture is then read from its keys and shapes, the rest from the
transformers defaults, each named in the metadata). ``config.json`` is the source of truth for
LayerNorm eps (1e-12 in every config class here, not timm's 1e-6), the activation, the patch and
image size and the head count; the weights must agree with it, or nothing is loaded.

:data:`HF_ARCHITECTURES` maps a config's ``model_type`` to its layout name and mapping function
``(state, config) -> (encoder tensors, metadata fields)``; ``config`` is ``{}`` for a weights file
alone. The state handed over is the base model's, in the key names ``save_pretrained`` writes
(transformers 5 renames its modules in memory, e.g. ``layers.i.attention.q_proj``, and writes the
long-standing ``encoder.layer.i.attention.attention.query`` names to disk; both are accepted).
Task models (``ViTForImageClassification``, ``ViTMAEForPreTraining``, ``BeitForMaskedImageModeling``,
...) are read through their base model prefix (``vit.``, ``beit.``, ``data2vec_vision.``); their heads
and decoders are dropped and named in ``source_dropped``.

* ``hf-vit`` (``ViTModel``) and ``hf-vitmae`` (``ViTMAEModel``) -> the ViT family: query/key/value
  concatenated into ``attn.qkv``; ViT's ``pooler`` (dense + tanh, not part of the token features) and
  ``mask_token`` dropped. ViTMAE's position embedding is the fixed 2-D sin-cos table, stored in the
  weights and taken as stored; the encoder runs without masking (MAE evaluates the full image; the
  config's ``mask_ratio`` applies to pre-training only).
* ``hf-beit`` (``BeitModel``) and ``hf-data2vec-vision`` (``Data2VecVisionModel``) -> the BEiT family:
  query/key/value weights concatenated, the query and value biases kept apart (the key has none),
  ``lambda_1/2`` -> ``gamma_1/2``, relative position tables per block or shared. A model built with
  ``use_mean_pooling=True`` has no per-token final norm (its only norm acts on the mean of the patch
  tokens) and is refused, as :mod:`mimbench.encoders.convert` refuses such fine-tuned checkpoints.
* ``hf-dinov2`` (``Dinov2Model``), ``hf-dinov2-registers`` (``Dinov2WithRegistersModel``) and ``hf-ijepa``
  (``IJepaModel``) -> the ViT family with layer scale, registers or no class token, by the readers of
  :mod:`mimbench.encoders.dinov2` and :mod:`mimbench.encoders.ijepa` (:func:`_vit_family_reader` adapts their
  ``(tensors, metadata)`` to this table's fields). They need config.json (a weights file alone is refused).
* ``hf-dinov3`` (``DINOv3ViTModel``) -> the Eva family by :func:`mimbench.encoders.eva_layouts.hf_dinov3_state`
  (:func:`map_hf_dinov3`): sizes, registers, q/k/v biases and the MLP kind (plain or gated) read off the weights
  and checked against config.json; eps, heads, image size, rotary base and activation from config.json, else
  DINOv3ViTConfig's defaults (a gated MLP: SiLU). ``embeddings.mask_token`` dropped; the block names are
  ``layer.i.*`` on disk and ``model.layer.i.*`` in memory, both read. A weights file alone is recognised by
  its bare ``embeddings.patch_embeddings`` conv next to ``layer.i.*`` blocks.

:func:`hf_folder_files` writes the reverse, folders ``transformers.AutoModel.from_pretrained`` loads: the ViT
family -> a ``ViTModel`` folder (plain ViTs), a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` folder (layer scale
and/or register tokens) or an ``IJepaModel`` folder (no class token; with registers or layer scale as well:
refused, no transformers class holds it); BEiT family -> a ``BeitModel`` folder; a DINOv3-style Eva encoder -> a
``DINOv3ViTModel`` folder (:func:`mimbench.encoders.eva_layouts.hf_dinov3_files`; EVA-02-style: refused, naming
why). Each is written at the
encoder's own image size, where transformers adds the stored position embedding without interpolating it.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file

from mimbench.encoders.arch import default_num_heads, mlp_hidden
from mimbench.encoders.beit import beit_metadata, rel_table_rows
from mimbench.encoders.dinov2 import hf_dinov2_registers_state, hf_dinov2_state, hf_dropped, swiglu_width
from mimbench.encoders.eva_layouts import hf_dinov3_files, hf_dinov3_state
from mimbench.encoders.file import HF_CONFIG, HF_WEIGHTS
from mimbench.encoders.ijepa import hf_ijepa_state
from mimbench.encoders.vit import non_plain_fields
from mimbench.errors import MimbenchError

#: Defaults of transformers' ViTConfig / ViTMAEConfig / BeitConfig / Data2VecVisionConfig, used for a weights
#: file read without its config.json (transformers 5.25, configuration_vit.py and siblings).
HF_DEFAULTS = {"layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": True}
#: Activations that are timm's nn.GELU (the erf form): transformers' ACT2FN["gelu"].
_GELU = ("gelu",)
#: Base-model prefixes of the task models (``ViTForImageClassification.vit`` ...).
_PREFIXES = ("vit.", "beit.", "data2vec_vision.", "dinov2.", "dinov2_with_registers.", "ijepa.")
# transformers 5 in-memory module names -> the names save_pretrained writes
_V5_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.attention\.q_proj\."), r"encoder.layer.\1.attention.attention.query."),
    (re.compile(r"^layers\.(\d+)\.attention\.k_proj\."), r"encoder.layer.\1.attention.attention.key."),
    (re.compile(r"^layers\.(\d+)\.attention\.v_proj\."), r"encoder.layer.\1.attention.attention.value."),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\.relative_position_bias\."), r"encoder.layer.\1.attention.attention.relative_position_bias."),
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
)
_LAYER = "encoder.layer.{i}."
_ATT = "encoder.layer.{i}.attention.attention."


class _Taker:
    """Pops tensors from an HF state dict by name, so that whatever is left at the end is named as unused."""

    def __init__(self, state: dict[str, torch.Tensor], where: str):
        self.state, self.where = dict(state), where

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise MimbenchError(f"{self.where}: tensor {key!r} is missing.",
                                "Give the complete save_pretrained folder or weights file of a supported model.")
        return self.state.pop(key)

    def drop(self, pattern: str) -> list[str]:
        names = [k for k in self.state if re.match(pattern, k)]
        for k in names:
            del self.state[k]
        return names

    def finish(self) -> None:
        if self.state:
            raise MimbenchError(f"{self.where}: tensors that belong to no encoder module: "
                                f"{', '.join(sorted(self.state)[:8])}" + (" ..." if len(self.state) > 8 else "") + ".",
                                "The weights do not match the architecture the config names; nothing was loaded.")


def _int_pair(value, what: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise MimbenchError(f"{where}: config.json {what} {value} is not square.", "Only square sizes are supported.")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MimbenchError(f"{where}: config.json {what} is {value!r}, not an integer.", "Fix config.json.")
    return value


class _Read:
    """The architecture as read, each value with where it came from (config.json, the weights, a default)."""

    def __init__(self, config: Mapping, where: str):
        self.config, self.where, self.values, self.origin = config, where, {}, {}

    def weights(self, name: str, value, config_key: str | None = None):
        """A value read off the weights; when config.json has ``config_key`` it must agree."""
        if config_key and config_key in self.config:
            said = self.config[config_key]
            said = _int_pair(said, config_key, self.where) if config_key in ("image_size", "patch_size") else said
            if said != value:
                raise MimbenchError(
                    f"{self.where}: config.json says {config_key}={said!r} but the weights imply {value!r} "
                    f"({name}).", "The config and the weights are of different models; nothing was loaded.")
            self.origin[name] = "config.json+weights"
        else:
            self.origin[name] = "weights"
        self.values[name] = value
        return value

    def config_or(self, name: str, config_key: str, default):
        """A value only config.json can say (eps, activation, heads); ``default`` without a config."""
        if config_key in self.config:
            self.origin[name] = "config.json"
            value = self.config[config_key]
        else:
            self.origin[name] = "transformers default"
            value = default
        self.values[name] = value
        return value

    def summary(self) -> str:
        groups: dict[str, list[str]] = {}
        for name, origin in self.origin.items():
            groups.setdefault(origin, []).append(f"{name}={self.values[name]}")
        return "; ".join(f"{origin}: {', '.join(items)}" for origin, items in sorted(groups.items()))


def _check_act(read: _Read) -> None:
    act = read.config_or("hidden_act", "hidden_act", HF_DEFAULTS["hidden_act"])
    if act not in _GELU:
        raise MimbenchError(f"{read.where}: hidden_act {act!r} is not supported (the encoder families use GELU, "
                            "transformers' 'gelu').", "Only models trained with hidden_act='gelu' can be read.")


def _embeddings(t: _Taker, read: _Read, out: dict, abs_pos: bool) -> tuple[int, int]:
    """cls token, patch embedding and (``abs_pos``) position embedding; returns (embed_dim, patch)."""
    w = t.take("embeddings.patch_embeddings.projection.weight")
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise MimbenchError(f"{read.where}: patch embedding of shape {tuple(w.shape)} is not a square conv.",
                            "Only square patches are supported.")
    out["patch_embed.proj.weight"] = w
    out["patch_embed.proj.bias"] = t.take("embeddings.patch_embeddings.projection.bias")
    out["cls_token"] = t.take("embeddings.cls_token")
    d = read.weights("embed_dim", int(w.shape[0]), "hidden_size")
    patch = read.weights("patch_size", int(w.shape[2]), "patch_size")
    read.weights("in_chans", int(w.shape[1]), "num_channels")
    if abs_pos:
        pos = t.take("embeddings.position_embeddings")
        grid = math.isqrt(int(pos.shape[1]) - 1)
        if grid * grid + 1 != pos.shape[1]:
            raise MimbenchError(f"{read.where}: position_embeddings has {pos.shape[1]} positions, not 1 + a square "
                                "grid.", "Only square grids with a class position are supported.")
        out["pos_embed"] = pos
        read.weights("img_size", grid * patch, "image_size")
    return d, patch


def _depth(t: _Taker) -> int:
    return len({int(m.group(1)) for k in t.state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})


def _block_common(t: _Taker, i: int, out: dict) -> None:
    """The tensors every block has: output projection, norms, MLP."""
    L, b = _LAYER.format(i=i), f"blocks.{i}."
    for src, dst in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                     ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
        out[b + dst + ".weight"] = t.take(L + src + ".weight")
        out[b + dst + ".bias"] = t.take(L + src + ".bias")


def _mlp_ratio(out: dict, read: _Read, d: int) -> float:
    hidden = read.weights("intermediate_size", int(out["blocks.0.mlp.fc1.weight"].shape[0]), "intermediate_size")
    ratio = hidden / d
    return ratio if mlp_hidden(d, ratio) == hidden else (hidden + 0.5) / d


def _heads(read: _Read, d: int, depth: int, from_table: int | None = None) -> int:
    if from_table is not None:
        return read.weights("num_heads", from_table, "num_attention_heads")
    heads = read.config_or("num_heads", "num_attention_heads", default_num_heads(d, depth))
    if not heads or d % heads:
        raise MimbenchError(f"{read.where}: the number of attention heads cannot be inferred for width {d} "
                            "without config.json.", "Put the model's config.json next to the weights file.")
    if read.origin["num_heads"] != "config.json":
        read.origin["num_heads"] = "standard size or 64-dim heads"
    return int(heads)


def _norm_eps(read: _Read) -> float:
    return float(read.config_or("norm_eps", "layer_norm_eps", HF_DEFAULTS["layer_norm_eps"]))


def _fields(out: dict, read: _Read, family: str, d: int, depth: int, heads: int, extra: dict) -> dict:
    arch = dict(img_size=read.values["img_size"], patch_size=read.values["patch_size"], embed_dim=d, depth=depth,
                num_heads=heads, mlp_ratio=_mlp_ratio(out, read, d))
    return dict(arch=arch, family=family, extra={"norm_eps": repr(_norm_eps(read)), **extra,
                                                  "source_read": read.summary()})


def map_hf_vit(state: dict[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``ViTModel`` / ``ViTMAEModel`` state -> ViT-family tensors and metadata fields."""
    where = config.get("_where", "HF ViT")
    t, read, out = _Taker(state, where), _Read(config, where), {}
    _check_act(read)
    dropped = t.drop(r"^pooler\.") + t.drop(r"^embeddings\.mask_token$")
    d, _ = _embeddings(t, read, out, abs_pos=True)
    depth = read.weights("depth", _depth(t), "num_hidden_layers")
    filled = 0
    for i in range(depth):
        A = _ATT.format(i=i)
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([t.take(A + f"{n}.weight") for n in ("query", "key", "value")])
        if t.has(A + "query.bias"):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([t.take(A + f"{n}.bias") for n in ("query", "key", "value")])
        else:  # qkv_bias=False: zero biases compute the same
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d, dtype=out["cls_token"].dtype)
            filled += 1
        _block_common(t, i, out)
    out["norm.weight"], out["norm.bias"] = t.take("layernorm.weight"), t.take("layernorm.bias")
    t.finish()
    extra = {"source_filled": f"attn.qkv.bias({filled}, zeros: qkv_bias=False)"} if filled else {}
    fields = _fields(out, read, "vit", d, depth, _heads(read, d, depth), extra)
    fields["dropped"] = dropped
    return out, fields


def _beit_tables(t: _Taker, read: _Read, out: dict, depth: int, abs_pos: bool) -> tuple[dict, int | None]:
    shared = "encoder.relative_position_bias.relative_position_bias_table"
    per_block = _ATT.format(i=0) + "relative_position_bias.relative_position_bias_table"
    flags = {"use_abs_pos_emb": abs_pos, "use_shared_rel_pos_bias": t.has(shared),
             "use_rel_pos_bias": t.has(per_block)}
    table = None
    if flags["use_shared_rel_pos_bias"]:
        table = out["rel_pos_bias.relative_position_bias_table"] = t.take(shared)
    for i in range(depth if flags["use_rel_pos_bias"] else 0):
        key = _ATT.format(i=i) + "relative_position_bias.relative_position_bias_table"
        table = out[f"blocks.{i}.attn.relative_position_bias_table"] = t.take(key)
    if table is not None:
        grid = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
        if rel_table_rows(grid) != table.shape[0]:
            raise MimbenchError(f"{read.where}: a relative position table of {table.shape[0]} rows belongs to no "
                                "square grid.", "The weights are not those of a BEiT model.")
        if not flags["use_abs_pos_emb"]:
            read.weights("img_size", grid * read.values["patch_size"], "image_size")
    elif not flags["use_abs_pos_emb"]:
        raise MimbenchError(f"{read.where}: neither absolute position embeddings nor relative position bias.",
                            "The weights are not those of a BEiT model.")
    return flags, None if table is None else int(table.shape[1])


def map_hf_beit(state: dict[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``BeitModel`` / ``Data2VecVisionModel`` state -> BEiT-family tensors and metadata fields."""
    where = config.get("_where", "HF BEiT")
    t, read, out = _Taker(state, where), _Read(config, where), {}
    _check_act(read)
    if not t.has("layernorm.weight") and (t.has("pooler.layernorm.weight") or config.get("use_mean_pooling")):
        raise MimbenchError(
            f"{where}: the model was built with use_mean_pooling=True: it has no per-token final norm (its only "
            "norm acts on the mean of the patch tokens), so it is no token-level encoder.",
            "Use a checkpoint saved with use_mean_pooling=False (e.g. the pre-training one).")
    dropped = t.drop(r"^embeddings\.mask_token$") + t.drop(r".*relative_position_index$") + t.drop(r"^pooler\.")
    abs_pos = t.has("embeddings.position_embeddings")
    d, _ = _embeddings(t, read, out, abs_pos=abs_pos)
    depth = read.weights("depth", _depth(t), "num_hidden_layers")
    flags, table_heads = _beit_tables(t, read, out, depth, abs_pos)
    flags["layer_scale_init_value"] = float(read.config_or("layer_scale_init_value", "layer_scale_init_value", 0.1)) \
        if t.has(_LAYER.format(i=0) + "lambda_1") else 0.0
    for i in range(depth):
        A, b = _ATT.format(i=i), f"blocks.{i}."
        if t.has(A + "key.bias"):
            raise MimbenchError(f"{where}: a key bias ({A}key.bias), which BEiT does not have.",
                                "The weights are not those of a BEiT model.")
        out[b + "attn.qkv.weight"] = torch.cat([t.take(A + f"{n}.weight") for n in ("query", "key", "value")])
        out[b + "attn.q_bias"], out[b + "attn.v_bias"] = t.take(A + "query.bias"), t.take(A + "value.bias")
        if flags["layer_scale_init_value"] > 0:
            out[b + "gamma_1"] = t.take(_LAYER.format(i=i) + "lambda_1")
            out[b + "gamma_2"] = t.take(_LAYER.format(i=i) + "lambda_2")
        _block_common(t, i, out)
    out["norm.weight"], out["norm.bias"] = t.take("layernorm.weight"), t.take("layernorm.bias")
    t.finish()
    heads = _heads(read, d, depth, table_heads)
    fields = _fields(out, read, "beit", d, depth, heads, beit_metadata(flags))
    fields["dropped"] = dropped
    return out, fields


#: Metadata fields that are the encoder file's own (arch, provenance), not a reader's extra fields.
_STANDARD = ("format", "arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "technique",
             "config_sha256", "epochs", "data", "code_version", "source", "family", "source_layout", "source_dropped")


def _vit_family_reader(reader: Callable) -> Callable:
    """A mapping function of this table from a reader ``(state, config, where) -> (tensors, metadata)`` of
    :mod:`mimbench.encoders.dinov2` / :mod:`mimbench.encoders.ijepa`: the metadata split into the fields
    ``arch``, ``family``, ``extra``, and the names it dropped."""

    def mapper(state: dict[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
        config = dict(config)
        tensors, meta = reader(state, config, config.pop("_where", reader.__name__))
        arch = {k: int(meta[k]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
        arch["mlp_ratio"] = float(meta["mlp_ratio"])
        extra = {k: v for k, v in meta.items() if k not in _STANDARD}
        return tensors, dict(arch=arch, family=meta.get("family", "vit"), extra=extra, dropped=hf_dropped(state))

    return mapper


#: DINOv3ViTConfig defaults (transformers 5.25, configuration_dinov3_vit.py) for a weights file without config.json.
DINOV3_HF_DEFAULTS = {"layer_norm_eps": 1e-5, "rope_theta": 100.0, "image_size": 224, "layerscale_value": 1.0}
#: Top-level tensors of a DINOv3ViTModel besides its blocks (``layer.i.*``).
_DINOV3_TOP = ("embeddings.cls_token", "embeddings.mask_token", "embeddings.register_tokens",
               "embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.bias", "norm.weight", "norm.bias")


def _dinov3_read(state: Mapping[str, torch.Tensor], read: _Read) -> dict:
    """The DINOv3ViTConfig fields the weights show (checked against config.json where it has them)."""
    w = state.get("embeddings.patch_embeddings.weight")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layer\.(\d+)\.", k))}
    if w is None or w.ndim != 4 or w.shape[2] != w.shape[3] or not layers or \
            "layer.0.mlp.down_proj.weight" not in state:
        raise MimbenchError(f"{read.where}: no square patch embedding (embeddings.patch_embeddings.weight) or no "
                            "layer.<i>.mlp in these DINOv3ViTModel weights.",
                            "Give the complete save_pretrained folder or weights file of a DINOv3ViTModel.")
    regs = state.get("embeddings.register_tokens")
    a = "layer.0.attention."
    shown = dict(hidden_size=int(w.shape[0]), patch_size=int(w.shape[2]), num_channels=int(w.shape[1]),
                 num_hidden_layers=len(layers), use_gated_mlp="layer.0.mlp.gate_proj.weight" in state,
                 intermediate_size=int(state["layer.0.mlp.down_proj.weight"].shape[1]),
                 num_register_tokens=0 if regs is None else int(regs.shape[1]),
                 query_bias=a + "q_proj.bias" in state, key_bias=a + "k_proj.bias" in state,
                 value_bias=a + "v_proj.bias" in state)
    return {key: read.weights(key, value, key) for key, value in shown.items()}


def map_hf_dinov3(state: dict[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``DINOv3ViTModel`` state -> Eva-family tensors and metadata fields, by
    :func:`mimbench.encoders.eva_layouts.hf_dinov3_state`. Sizes, register count, biases and the MLP kind are read
    off the weights and must agree with config.json; eps, heads, image size, rotary base and activation come from
    config.json, else from DINOv3ViTConfig's defaults (a gated MLP: SiLU, as DINOv3's gated models are published)."""
    where = config.get("_where", "HF DINOv3")
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    foreign = sorted(k for k in state if k not in _DINOV3_TOP and not re.match(r"layer\.\d+\.", k))
    if foreign:
        raise MimbenchError(f"{where}: tensors that belong to no DINOv3ViTModel module: {', '.join(foreign[:8])}.",
                            "The weights do not match the architecture the config names; nothing was loaded.")
    read = _Read(config, where)
    full = {k: v for k, v in config.items() if k != "_where"} | _dinov3_read(state, read)
    gated = full["use_gated_mlp"]
    full["hidden_act"] = read.config_or("hidden_act", "hidden_act", "silu" if gated else "gelu")
    if gated and read.origin["hidden_act"] != "config.json":
        read.origin["hidden_act"] = "DINOv3 gated-MLP default"  # DINOv3ViTConfig's own default is gelu
    for key, default in DINOV3_HF_DEFAULTS.items():
        full[key] = read.config_or(key, key, default)
    full["image_size"] = _int_pair(full["image_size"], "image_size", where)
    d, depth = full["hidden_size"], full["num_hidden_layers"]
    full["num_attention_heads"] = _heads(read, d, depth)
    if not full["num_register_tokens"]:
        state.pop("embeddings.register_tokens", None)  # DINOv3ViTModel stores (1, 0, D) without registers
    try:
        tensors, meta = hf_dinov3_state(state, full)
    except KeyError as e:
        raise MimbenchError(f"{where}: tensor {e.args[0]!r} is missing.",
                            "Give the complete save_pretrained folder or weights file of a DINOv3ViTModel.") from None
    arch = {k: int(meta[k]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    arch["mlp_ratio"] = float(meta["mlp_ratio"])
    extra = {k: v for k, v in meta.items() if k not in _STANDARD} | {"source_read": read.summary()}
    dropped = [k for k in state if k == "embeddings.mask_token"]
    return tensors, dict(arch=arch, family="eva", extra=extra, dropped=dropped)


#: config.json ``model_type`` -> (layout name, mapping function). One entry per supported architecture.
HF_ARCHITECTURES: dict[str, tuple[str, Callable]] = {
    "vit": ("hf-vit", map_hf_vit),
    "vit_mae": ("hf-vitmae", map_hf_vit),
    "beit": ("hf-beit", map_hf_beit),
    "data2vec-vision": ("hf-data2vec-vision", map_hf_beit),
    "dinov2": ("hf-dinov2", _vit_family_reader(hf_dinov2_state)),
    "dinov2_with_registers": ("hf-dinov2-registers", _vit_family_reader(hf_dinov2_registers_state)),
    "ijepa": ("hf-ijepa", _vit_family_reader(hf_ijepa_state)),
    "dinov3_vit": ("hf-dinov3", map_hf_dinov3),
}
#: The model classes each model type's layout is named after (for messages and docs).
HF_CLASSES = {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "beit": "BeitModel", "data2vec-vision": "Data2VecVisionModel",
              "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel", "ijepa": "IJepaModel",
              "dinov3_vit": "DINOv3ViTModel"}


def hf_layouts() -> tuple[str, ...]:
    """The layout names of :data:`HF_ARCHITECTURES`, in table order."""
    return tuple(layout for layout, _ in HF_ARCHITECTURES.values())


def _supported() -> str:
    return ", ".join(f"{HF_CLASSES.get(mt, mt)} ({mt}, --from {layout})" for mt, (layout, _) in HF_ARCHITECTURES.items())


def is_hf_folder(path: Path) -> bool:
    """A directory holding a ``config.json`` (what ``save_pretrained`` writes)."""
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


def read_config(folder: Path) -> dict:
    """``config.json`` of an HF folder, parsed; MimbenchError when absent or not a JSON object."""
    path = Path(folder) / HF_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MimbenchError(f"{path} cannot be read as JSON ({e}).", "Give a folder written by save_pretrained.") from None
    if not isinstance(config, dict):
        raise MimbenchError(f"{path} holds a {type(config).__name__}, not a JSON object.", "Fix config.json.")
    return config


def layout_of_config(config: Mapping, where: str) -> str:
    """The layout of the architecture ``config.json`` names; an unsupported one is an error naming both sides."""
    model_type = config.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise MimbenchError(f"{where}: config.json names model_type {model_type!r} (architectures: {archs}), which "
                            "is not a supported encoder architecture.", f"Supported: {_supported()}.")
    return HF_ARCHITECTURES[model_type][0]


def weights_file(folder: Path) -> Path:
    """The weights file of an HF folder (``model.safetensors`` preferred, else ``pytorch_model.bin``)."""
    for name in HF_WEIGHTS:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    sharded = sorted(p.name for p in Path(folder).glob("*.index.json"))
    raise MimbenchError(f"{folder}: no {' or '.join(HF_WEIGHTS)}" + (f" (sharded weights: {sharded[0]})" if sharded
                                                                    else "") + ".",
                        "Save the model unsharded (save_pretrained(..., max_shard_size='100GB')).")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """An HF weights file as a dict of tensors: safetensors, or a PyTorch file read weights-only."""
    path = Path(path)
    try:
        obj = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                      weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).splitlines() or ["unsupported object"])[0]
        raise MimbenchError(f"{path} was refused for safety: loading it needs arbitrary unpickling, which can run "
                            f"code (torch.load with weights_only=True says: {first}).",
                            "Save the model with save_pretrained (model.safetensors) from a session you trust.") from None
    except Exception as e:
        raise MimbenchError(f"{path} cannot be read as a weights file ({e}).", "The file is corrupt or truncated.") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MimbenchError(f"{path} is not a flat dict of tensors.", "Give the weights save_pretrained writes.")
    return obj


def base_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The base model's tensors in save_pretrained names (task-model prefix stripped, transformers-5 in-memory
    names renamed) and the names of the task model's own modules (heads, decoders), dropped."""
    dropped: list[str] = []
    prefix = next((p for p in _PREFIXES if any(k.startswith(p + "embeddings.") for k in state)), None)
    out = {}
    for k, v in state.items():
        if prefix and not k.startswith(prefix):
            if k.startswith("layernorm.") and not any(x.startswith(prefix + "layernorm.") for x in state):
                out[k] = v  # BeitForMaskedImageModeling keeps the final norm outside its base model
            else:
                dropped.append(k)
            continue
        name = k[len(prefix):] if prefix else k
        for pattern, repl in _V5_RENAMES:
            name, n = pattern.subn(repl, name)
            if n:
                break
        out[name] = v
    return out, dropped


def detect_hf_layouts(keys) -> list[str]:
    """The HF layouts a weights file alone can be (several when the keys cannot tell them apart); [] if none."""
    state = dict.fromkeys(keys)
    if "embeddings.patch_embeddings.weight" in state and any(k.startswith(("layer.", "model.layer.")) for k in state):
        return ["hf-dinov3"]  # DINOv3ViTModel: a bare conv (no .projection), blocks under layer.<i>
    base, dropped = base_state(state)
    if "embeddings.patch_embeddings.projection.weight" not in base:
        return []
    if any(k.endswith("layer_scale1.lambda1") for k in base):  # DINOv2's layer scale (BEiT's is lambda_1)
        return ["hf-dinov2-registers"] if "embeddings.register_tokens" in base else ["hf-dinov2"]
    if "embeddings.cls_token" not in base:  # the only HF ViT here without a class token
        return ["hf-ijepa"]
    beit = any(k.endswith(("lambda_1", "relative_position_bias_table")) for k in base) or any(
        k.endswith("attention.attention.query.bias") for k in base) and not any(
        k.endswith("attention.attention.key.bias") for k in base)
    if beit:
        if any(k.startswith("data2vec_vision.") for k in keys):
            return ["hf-data2vec-vision"]
        return ["hf-beit"] if any(k.startswith("beit.") for k in keys) else ["hf-beit", "hf-data2vec-vision"]
    if any(k.startswith("decoder.") for k in dropped):
        return ["hf-vitmae"]
    return ["hf-vit"] if any(k.startswith("pooler.") for k in base) else ["hf-vit", "hf-vitmae"]


def map_hf_state(state: Mapping[str, torch.Tensor], config: Mapping, layout: str,
                 where: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder tensors and metadata fields (``arch``, ``family``, ``extra``, ``dropped``) of an HF state."""
    mapper = next((fn for lay, fn in HF_ARCHITECTURES.values() if lay == layout), None)
    if mapper is None:
        raise MimbenchError(f"{where}: {layout!r} is not an HF layout.", f"Supported: {_supported()}.")
    base, dropped = base_state(state)
    tensors, fields = mapper(base, {**config, "_where": where})
    fields["dropped"] = dropped + fields.get("dropped", [])
    return {k: v.detach().contiguous() for k, v in tensors.items()}, fields


def _vit_config(arch: Mapping, in_chans: int, eps: float) -> dict:
    d = int(arch["embed_dim"])
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": d,
            "num_hidden_layers": int(arch["depth"]), "num_attention_heads": int(arch["num_heads"]),
            "intermediate_size": mlp_hidden(d, float(arch["mlp_ratio"])), "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": eps, "image_size": int(arch["img_size"]), "patch_size": int(arch["patch_size"]),
            "num_channels": in_chans, "qkv_bias": True, "encoder_stride": int(arch["patch_size"])}


def _hf_blocks(tensors: Mapping[str, torch.Tensor], depth: int, beit: bool) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(depth):
        b, L, A = f"blocks.{i}.", _LAYER.format(i=i), _ATT.format(i=i)
        for n, w in zip(("query", "key", "value"), tensors[b + "attn.qkv.weight"].chunk(3)):
            out[A + n + ".weight"] = w
        if beit:
            out[A + "query.bias"], out[A + "value.bias"] = tensors[b + "attn.q_bias"], tensors[b + "attn.v_bias"]
            for src, dst in (("gamma_1", "lambda_1"), ("gamma_2", "lambda_2")):
                if b + src in tensors:
                    out[L + dst] = tensors[b + src]
            if b + "attn.relative_position_bias_table" in tensors:
                out[A + "relative_position_bias.relative_position_bias_table"] = \
                    tensors[b + "attn.relative_position_bias_table"]
        else:
            for n, v in zip(("query", "key", "value"), tensors[b + "attn.qkv.bias"].chunk(3)):
                out[A + n + ".bias"] = v
        for src, dst in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            out[L + dst + ".weight"], out[L + dst + ".bias"] = tensors[b + src + ".weight"], tensors[b + src + ".bias"]
    return out


#: ViT-layout block module names -> Dinov2's (the names Dinov2Model's save_pretrained writes, transformers 5.25).
_TO_DINOV2 = re.compile(r"^(encoder\.layer\.\d+\.)(layernorm_before|layernorm_after|intermediate\.dense|output\.dense)\.")
_DINOV2_NAMES = {"layernorm_before": "norm1", "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1",
                 "output.dense": "mlp.fc2"}


def _embed_parts(tensors: Mapping[str, torch.Tensor], flags: Mapping) -> tuple:
    """``(class position (1, 1, D) or None, register tokens with any position they had, patch positions)`` of a
    ViT-family encoder: timm adds ``pos_embed`` after the prefix tokens are joined (prefix slots first) unless
    ``no_embed_class``, where the prefix tokens get no position (a zero class position computes the same)."""
    pos, d = tensors["pos_embed"], int(tensors["patch_embed.proj.weight"].shape[0])
    regs = int(flags.get("reg_tokens") or 0)
    cls = int(bool(flags.get("class_token", True)))
    reg = tensors.get("reg_token")
    if flags.get("no_embed_class"):
        return (torch.zeros(1, 1, d, dtype=pos.dtype) if cls else None), reg, pos
    if reg is not None:
        reg = reg + pos[:, cls:cls + regs]
    return (pos[:, :1] if cls else None), reg, pos[:, cls + regs:]


def _hf_common(tensors: Mapping[str, torch.Tensor], arch: Mapping, eps: float) -> tuple[dict, dict]:
    """The config fields and tensors every ViT-style HF export shares (sizes, eps, patch embedding, final norm)."""
    config = {"hidden_size": int(arch["embed_dim"]), "num_hidden_layers": int(arch["depth"]),
              "num_attention_heads": int(arch["num_heads"]), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": eps,
              "image_size": int(arch["img_size"]), "patch_size": int(arch["patch_size"]),
              "num_channels": int(tensors["patch_embed.proj.weight"].shape[1]), "qkv_bias": True}
    state = {"embeddings.patch_embeddings.projection.weight": tensors["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": tensors["patch_embed.proj.bias"],
             "layernorm.weight": tensors["norm.weight"], "layernorm.bias": tensors["norm.bias"]}
    state.update(_hf_blocks(tensors, int(arch["depth"]), beit=False))
    return config, state


def _dinov2_ratio(arch: Mapping, flags: Mapping) -> int:
    """Dinov2Config's ``mlp_ratio`` (an int: a strict dataclass field in transformers 5.25) that builds the encoder's
    MLP width: D * ratio for GELU; for SwiGLU one whose rule ceil8(int(D * ratio * 2/3)) gives the stored width."""
    d, ratio = int(arch["embed_dim"]), float(arch["mlp_ratio"])
    if flags.get("swiglu_mlp"):
        hidden = mlp_hidden(d, ratio) // 2
        found = next((r for r in range(1, 17) if swiglu_width(d, r) == hidden), None)
        if found is None:
            raise MimbenchError(f"A Dinov2Model cannot hold this encoder: no integer mlp_ratio gives its SwiGLU width "
                                f"{hidden} by DINOv2's rule (ceil8(int(D * ratio * 2/3)), D = {d}).",
                                "Export it with --to timm.")
        return found
    if not ratio.is_integer():
        raise MimbenchError(f"A Dinov2Model cannot hold this encoder: its MLP ratio is {ratio:g}, and Dinov2Config "
                            "takes an integer mlp_ratio.", "Export it with --to timm.")
    return int(ratio)


def _dinov2_folder(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], arch: Mapping, flags: Mapping,
                   eps: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """A class-token ViT with layer scale and/or registers -> ``Dinov2Model`` (no registers) or
    ``Dinov2WithRegistersModel``: block names as Dinov2 saves them, layer scale ``ls{1,2}.gamma`` ->
    ``layer_scale{1,2}.lambda1`` (ones without layer scale: identity), a class slot in ``position_embeddings``
    (zero for ``no_embed_class``), registers without position (any they had folded in). At the config's
    ``image_size`` transformers adds ``position_embeddings`` as stored (it interpolates only at other sizes)."""
    ratio, swiglu = _dinov2_ratio(arch, flags), bool(flags.get("swiglu_mlp"))
    config, state = _hf_common(tensors, arch, eps)
    d, regs = int(arch["embed_dim"]), int(flags.get("reg_tokens") or 0)
    state = {(_TO_DINOV2.sub(lambda m: m.group(1) + _DINOV2_NAMES[m.group(2)] + ".", k)): v for k, v in state.items()}
    if swiglu:  # Dinov2SwiGLUFFN's saved names: weights_in (gate, then value), weights_out
        state = {k.replace(".mlp.fc1.", ".mlp.weights_in.").replace(".mlp.fc2.", ".mlp.weights_out."): v
                 for k, v in state.items()}
    for i in range(int(arch["depth"])):
        for n in ("1", "2"):
            gamma = tensors.get(f"blocks.{i}.ls{n}.gamma")
            state[f"encoder.layer.{i}.layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(d)
    cls_pos, reg, patch_pos = _embed_parts(tensors, flags)
    state["embeddings.cls_token"] = tensors["cls_token"]
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    config.update(mlp_ratio=ratio, layerscale_value=float(flags.get("init_values") or 1.0),
                  drop_path_rate=0.0, use_swiglu_ffn=swiglu, apply_layernorm=True, reshape_hidden_states=True)
    if regs:
        state["embeddings.register_tokens"] = reg
        state["embeddings.mask_token"] = torch.zeros(1, d)  # always built by the registers model; unused
        config.update(architectures=["Dinov2WithRegistersModel"], model_type="dinov2_with_registers",
                      num_register_tokens=regs)
    else:
        config.update(architectures=["Dinov2Model"], model_type="dinov2", use_mask_token=False)
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}


def _ijepa_folder(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], arch: Mapping, flags: Mapping,
                  eps: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """A ViT without class token (I-JEPA style) -> ``IJepaModel``, whose embeddings are the patch tokens plus
    ``position_embeddings`` of exactly the ``N`` patch positions (no class slot, no registers, no layer scale)."""
    extra = [k for k in ("reg_tokens", "init_values", "swiglu_mlp") if flags.get(k)]
    if extra:
        raise MimbenchError(f"An IJepaModel cannot hold this encoder ({', '.join(f'{k}={meta.get(k)}' for k in extra)}"
                            ": it has no class token, and IJepaModel has no register tokens, layer scale or SwiGLU "
                            "MLP either).",
                            "Export it with --to timm.")
    config, state = _hf_common(tensors, arch, eps)
    d = int(arch["embed_dim"])
    state["embeddings.position_embeddings"] = tensors["pos_embed"]
    config.update(architectures=["IJepaModel"], model_type="ijepa", intermediate_size=mlp_hidden(d, float(arch["mlp_ratio"])),
                  pooler_output_size=d, pooler_act="tanh")
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}


def hf_folder_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], arch: Mapping, flags: Mapping,
                    eps: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, state in save_pretrained names)`` of an encoder: ViT family -> ``ViTModel``, or
    ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (layer scale and/or registers, :func:`_dinov2_folder`) or
    ``IJepaModel`` (no class token, :func:`_ijepa_folder`); BEiT family -> ``BeitModel``
    (``use_mean_pooling=False``: the class token after the final norm, as the encoder)."""
    family = meta.get("family", "vit")
    if family == "eva":  # DINOv3-style -> DINOv3ViTModel; others (EVA-02) refused, naming why
        return hf_dinov3_files(tensors, meta, arch, flags, eps)
    if family == "vit" and non_plain_fields(flags):  # a ViTModel has a class token, no registers, no layer scale
        return (_ijepa_folder if not flags.get("class_token", True) else _dinov2_folder)(tensors, meta, arch, flags, eps)
    in_chans = int(tensors["patch_embed.proj.weight"].shape[1])
    config = _vit_config(arch, in_chans, eps)
    state = {"embeddings.cls_token": tensors["cls_token"],
             "embeddings.patch_embeddings.projection.weight": tensors["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": tensors["patch_embed.proj.bias"],
             "layernorm.weight": tensors["norm.weight"], "layernorm.bias": tensors["norm.bias"]}
    if "pos_embed" in tensors:
        state["embeddings.position_embeddings"] = tensors["pos_embed"]
    state.update(_hf_blocks(tensors, int(arch["depth"]), beit=family == "beit"))
    if family == "beit":
        if "rel_pos_bias.relative_position_bias_table" in tensors:
            state["encoder.relative_position_bias.relative_position_bias_table"] = \
                tensors["rel_pos_bias.relative_position_bias_table"]
        del config["qkv_bias"], config["encoder_stride"]
        config.update(architectures=["BeitModel"], model_type="beit", use_mask_token=False, use_mean_pooling=False,
                      use_absolute_position_embeddings=bool(flags["use_abs_pos_emb"]),
                      use_relative_position_bias=bool(flags["use_rel_pos_bias"]),
                      use_shared_relative_position_bias=bool(flags["use_shared_rel_pos_bias"]),
                      layer_scale_init_value=float(flags["layer_scale_init_value"]), drop_path_rate=0.0)
    elif family != "vit":
        raise MimbenchError(f"Export to Hugging Face is not available for the {family!r} family.",
                            "Export it with --to timm.")
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}  # no shared storage
