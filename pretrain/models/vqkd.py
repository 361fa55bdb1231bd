"""The VQ-KD visual tokenizer model (Peng et al. 2022, "BEiT v2") and its registry entries.

VQ-KD (:class:`VQKD`)
    A ViT encoder (timm ``Beit`` blocks, absolute position embeddings, patch tokens through the
    final ``fc_norm``) -> ``encode_task_layer`` (Linear-Tanh-Linear to ``code_dim``) -> the
    vector quantiser :class:`NormEMAQuantizer` -> a ViT decoder on the ``H x W`` grid of code
    vectors (patch size 1) -> ``decode_task_layer`` (Linear-Tanh-Linear to the teacher's width),
    trained to maximise the cosine similarity with a frozen teacher's patch features, plus the
    quantiser's commitment loss. These are the official code's module names, so the official
    checkpoint maps onto this model almost key for key (:func:`pretrain.tokenizer.load_official_vqkd`).

    Teacher: BEiT v2 distils CLIP ViT-B/16 (or DINO). This project accepts *any encoder file*
    (``teacher=path``, loaded with :func:`mimbench.load_encoder`), so the demo-scale tokenizer is
    trained on the embedded Fashion-MNIST data with a project encoder (e.g. the demo MAE) as
    teacher - a self-contained stand-in for CLIP, not a reproduction of the released tokenizer.
    The teacher target is the teacher's final-norm patch tokens; its patch grid must equal the
    tokenizer's.

Quantiser (:class:`NormEMAQuantizer`)
    Codebook of ``num_tokens`` unit vectors; inputs are l2-normalised and assigned to the code of
    largest cosine similarity (= smallest Euclidean distance on the unit sphere). Training updates
    the codebook by an exponential moving average (decay 0.99) of the normalised mean of the
    vectors assigned to each code, re-normalised (codes with no assignment keep their value);
    ``usage`` is the EMA of per-step assignment counts. Initialisation by spherical k-means on the
    first training batch (``kmeans_init``), as the official recipe does. Gradients reach the encoder
    by the straight-through estimator; commitment loss ``beta * mse(sg(z_q), z)`` with beta 1.
    Dead-code restart (this project's addition; the official code has none, ``dead_code_ratio=0``
    turns it off): after each training update, codes whose usage EMA is below
    ``dead_code_ratio`` times the mean usage are re-seeded with randomly chosen (normalised)
    encoder outputs of the current batch and given the mean usage, so they are not re-seeded again
    before they had a chance to attract vectors. Under DistributedDataParallel the counts and sums
    are all-reduced and the re-seeding vectors come from rank 0, so every rank keeps the same codebook.

File
    :meth:`VQKD.save` (the model's export) writes ``tokenizer.safetensors``: tensors = the model
    without the teacher, metadata ``format=mimbench-tokenizer/1`` and the constructor arguments as
    JSON; :func:`pretrain.tokenizer.load_tokenizer` reads it back.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.beit import Beit
from torch import nn

from mimbench.atomic import atomic_write
from mimbench.encoders import load_encoder
from mimbench.errors import MimbenchError
from pretrain.contract import TOKENIZER_FILE, StepContract, VisualTokenizer
from pretrain.registry import register

TOKENIZER_FORMAT = "mimbench-tokenizer/1"
INPUT_SCALINGS = ("identity", "imagenet_to_pm1")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None):
    """k-means with cosine similarity on unit vectors ``x`` (``M x D``): ``(centres k x D, counts k)``.

    Centres start at ``k`` random samples (with replacement when ``M < k``); empty clusters keep
    their previous centre."""
    m = x.shape[0]
    if m >= k:
        idx = torch.randperm(m, generator=generator, device="cpu")[:k].to(x.device)
    else:
        idx = torch.randint(0, m, (k,), generator=generator, device="cpu").to(x.device)
    centres = x[idx].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = (x @ centres.t()).argmax(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
        centres = torch.where((counts == 0)[:, None], centres, new)
    return centres, counts


class NormEMAQuantizer(nn.Module):
    """l2-normalised codebook with EMA updates and dead-code restart (module docstring).

    Args:
        num_tokens: codebook size ``K``.
        dim: code dimension ``D``.
        decay: EMA decay of the codebook and of ``usage``.
        commitment: weight of the commitment loss.
        kmeans_init: initialise the codebook by spherical k-means on the first training batch.
        dead_code_ratio: a code is dead when ``usage < dead_code_ratio * usage.mean()`` (0 = never).

    Buffers (all in ``state_dict``): ``codebook`` (K x D, unit rows), ``usage`` (K),
    ``initialized`` (0-d bool).
    """

    def __init__(self, num_tokens: int, dim: int, decay: float = 0.99, commitment: float = 1.0,
                 kmeans_init: bool = True, dead_code_ratio: float = 0.01) -> None:
        super().__init__()
        if int(num_tokens) < 2 or int(dim) < 1:
            raise MimbenchError(f"A codebook needs >= 2 codes of dimension >= 1, got {num_tokens} x {dim}.")
        if not 0.0 <= float(decay) < 1.0:
            raise MimbenchError(f"codebook decay must be in [0, 1), got {decay!r}.")
        if float(dead_code_ratio) < 0:
            raise MimbenchError(f"dead_code_ratio must be >= 0, got {dead_code_ratio!r}.")
        self.num_tokens, self.dim = int(num_tokens), int(dim)
        self.decay, self.commitment = float(decay), float(commitment)
        self.dead_code_ratio = float(dead_code_ratio)
        self.register_buffer("codebook", F.normalize(torch.randn(self.num_tokens, self.dim), dim=-1))
        self.register_buffer("usage", torch.zeros(self.num_tokens))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.last_restarted = 0

    def extra_repr(self) -> str:
        return (f"num_tokens={self.num_tokens}, dim={self.dim}, decay={self.decay}, "
                f"commitment={self.commitment}, dead_code_ratio={self.dead_code_ratio}")

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (int64, ``z.shape[:-1]``) of the nearest codes to the l2-normalised ``z``."""
        flat = F.normalize(z.float(), dim=-1).reshape(-1, self.dim)
        return (flat @ self.codebook.t()).argmax(1).reshape(z.shape[:-1])

    def usage_stats(self) -> dict[str, float]:
        """``codes_used`` (fraction of codes with usage above the dead threshold, or > 0 when the
        restart is off) and ``perplexity`` (exp of the entropy of the usage distribution; K = uniform)."""
        u = self.usage.float()
        total = float(u.sum())
        if total <= 0:
            return {"codes_used": 0.0, "perplexity": 0.0}
        p = u / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        threshold = self.dead_code_ratio * float(u.mean())
        used = (u > threshold).float().mean()
        return {"codes_used": float(used), "perplexity": float(entropy.exp())}

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        dist = _dist()
        centres, counts = spherical_kmeans(flat, self.num_tokens)
        if dist is not None:  # every rank starts from rank 0's centres
            dist.broadcast(centres, 0)
            dist.broadcast(counts, 0)
        self.codebook.copy_(centres)
        self.usage.copy_(counts)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids, minlength=self.num_tokens).to(flat.dtype)
        sums = torch.zeros_like(self.codebook).index_add_(0, ids, flat)
        dist = _dist()
        if dist is not None:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
        moved = F.normalize(self.decay * self.codebook + (1.0 - self.decay) * means, dim=-1)
        # codes without assignment keep their exact value
        self.codebook.copy_(torch.where((counts == 0)[:, None], self.codebook, moved))

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Re-seed dead codes with random rows of ``flat`` (unit vectors, ``M x D``); returns how many."""
        if self.dead_code_ratio <= 0:
            return 0
        mean = self.usage.mean()
        dead = self.usage < self.dead_code_ratio * mean
        n = int(dead.sum())
        if n == 0 or float(mean) <= 0:
            return 0
        picks = flat[torch.randint(0, flat.shape[0], (n,), device=flat.device)]
        dist = _dist()
        if dist is not None:
            dist.broadcast(picks, 0)
        self.codebook[dead] = picks
        self.usage[dead] = mean
        return n

    def forward(self, z: torch.Tensor):
        """``z``: ``N x L x D`` encoder outputs -> ``(z_q, ids, loss)``: straight-through quantised
        unit vectors ``N x L x D`` (float32), code ids ``N x L``, commitment loss (scalar)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            flat = z.reshape(-1, self.dim)
            if self.training and not bool(self.initialized):
                self._init_codebook(flat.detach())
            ids = (flat.detach() @ self.codebook.t()).argmax(1)
            z_q = self.codebook[ids].reshape(z.shape)  # indexing copies: later in-place updates do not touch it
            if self.training:
                self._ema_update(flat.detach(), ids)
                self.last_restarted = self.restart_dead_codes(flat.detach())
            loss = self.commitment * F.mse_loss(z_q.detach(), z)
            z_q = z + (z_q - z).detach()
        return z_q, ids.reshape(z.shape[:-1]), loss


def _beit(img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
          mlp_ratio: float, drop_path_rate: float = 0.0):
    """A timm ``Beit`` as VQ-KD's encoder/decoder: absolute position embeddings, no relative bias,
    no layer scale, patch tokens through ``fc_norm`` (LayerNorm eps 1e-6), no head."""
    return Beit(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, qkv_bias=True, mlp_ratio=mlp_ratio,
                drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=None,
                use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False)


def _patch_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens of a VQ-KD encoder/decoder: ``fc_norm(forward_features(x)[:, 1:])`` (``N x L x D``)."""
    return vit.fc_norm(vit.forward_features(x)[:, vit.num_prefix_tokens:])


def _task_layer(d_in: int, d_out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(d_in, d_in), nn.Tanh(), nn.Linear(d_in, d_out))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


class VQKD(StepContract, VisualTokenizer):
    """Vector-quantised knowledge-distillation tokenizer (module docstring).

    Contract (:class:`pretrain.contract.PretrainModel`): masks nothing, exports its own file.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the encoder ViT.
        decoder_depth, decoder_embed_dim, decoder_num_heads: the decoder ViT (width/heads default
            to the encoder's; BEiT v2: 3 blocks of 768).
        num_tokens, code_dim: codebook size and code dimension (BEiT v2: 8192 x 32).
        decay, commitment, kmeans_init, dead_code_ratio: :class:`NormEMAQuantizer`.
        teacher: encoder file whose patch features are distilled (``None`` = tokenize only).
        teacher_dim: width of the regression target (``None`` = the teacher's ``embed_dim``).
        input_scaling: ``"identity"`` (the encoder sees the training pipeline's normalised images)
            or ``"imagenet_to_pm1"`` (undo ImageNet mean/std, then map [0, 1] to [-1, 1], the
            official tokenizer's input convention; set when loading an official checkpoint).
        drop_path_rate: stochastic depth in the encoder.
    """

    mask_input = "none"
    exports = "tokenizer"
    encoder_family = "vqkd"
    export_name = TOKENIZER_FILE

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, decoder_depth: int = 3,
                 decoder_embed_dim: int | None = None, decoder_num_heads: int | None = None,
                 num_tokens: int = 8192, code_dim: int = 32, decay: float = 0.99, commitment: float = 1.0,
                 kmeans_init: bool = True, dead_code_ratio: float = 0.01, teacher: str | None = None,
                 teacher_dim: int | None = None, input_scaling: str = "identity",
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if input_scaling not in INPUT_SCALINGS:
            raise MimbenchError(f"Unknown input_scaling {input_scaling!r}.", f"Use one of: {', '.join(INPUT_SCALINGS)}.")
        if img_size % patch_size:
            raise MimbenchError(f"Tokenizer img_size {img_size} is not a multiple of patch_size {patch_size}.")
        dec_dim = int(decoder_embed_dim or embed_dim)
        dec_heads = int(decoder_num_heads or num_heads)
        grid = img_size // patch_size
        self.img_size, self.patch_size = int(img_size), int(patch_size)
        self.grid_size = (grid, grid)
        self.num_tokens = int(num_tokens)
        self.input_scaling = input_scaling
        self.teacher_path = None if teacher is None else str(teacher)
        self.teacher = self._load_teacher(teacher) if teacher is not None else None
        if teacher_dim is None:
            if self.teacher is None:
                raise MimbenchError("VQ-KD needs teacher_dim when it has no teacher.",
                                    "Give teacher=<encoder file> to train, or teacher_dim to only tokenize.")
            teacher_dim = int(self.teacher.embed_dim)
        self.teacher_dim = int(teacher_dim)
        self.config = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=int(in_chans),
                           embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads),
                           mlp_ratio=float(mlp_ratio), decoder_depth=int(decoder_depth), decoder_embed_dim=dec_dim,
                           decoder_num_heads=dec_heads, num_tokens=self.num_tokens, code_dim=int(code_dim),
                           decay=float(decay), commitment=float(commitment), kmeans_init=bool(kmeans_init),
                           dead_code_ratio=float(dead_code_ratio), teacher_dim=self.teacher_dim,
                           input_scaling=input_scaling)
        self.encoder = _beit(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.encode_task_layer = _task_layer(embed_dim, code_dim)
        self.quantize = NormEMAQuantizer(num_tokens, code_dim, decay, commitment, kmeans_init, dead_code_ratio)
        self.decoder = _beit(grid, 1, code_dim, dec_dim, decoder_depth, dec_heads, mlp_ratio)
        self.decode_task_layer = _task_layer(dec_dim, self.teacher_dim)
        self._loss_terms: dict[str, torch.Tensor] = {}

    def _load_teacher(self, path) -> nn.Module:
        teacher = load_encoder(path, img_size=self.img_size)
        grid = self.img_size // int(teacher.patch_embed.patch_size[0])
        if (grid, grid) != self.grid_size:
            raise MimbenchError(
                f"Teacher {path} has a {grid}x{grid} patch grid at {self.img_size} px, the tokenizer "
                f"{self.grid_size[0]}x{self.grid_size[1]}.",
                "Use a teacher with the tokenizer's patch size: one teacher feature per token is regressed.")
        teacher.requires_grad_(False)
        return teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ pieces
    def scale_input(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.input_scaling == "identity":
            return imgs
        mean = imgs.new_tensor(_IMAGENET_MEAN)[None, :, None, None]
        std = imgs.new_tensor(_IMAGENET_STD)[None, :, None, None]
        return (imgs * std + mean) * 2.0 - 1.0

    def encode(self, imgs: torch.Tensor):
        """``(z_q N x L x code_dim, ids N x L, commitment loss)``."""
        feats = _patch_tokens(self.encoder, self.scale_input(imgs))
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            z = self.encode_task_layer(feats.float())
        return self.quantize(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """``N x L x code_dim`` -> teacher-space predictions ``N x L x teacher_dim``."""
        n, length, c = z_q.shape
        h, w = self.grid_size
        x = z_q.transpose(1, 2).reshape(n, c, h, w)
        return self.decode_task_layer(_patch_tokens(self.decoder, x))

    @torch.no_grad()
    def teacher_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        t = self.teacher.forward_features(imgs)
        return t[:, getattr(self.teacher, "num_prefix_tokens", 1):]

    @torch.no_grad()
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        feats = _patch_tokens(self.encoder, self.scale_input(imgs))
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            return self.quantize.lookup(self.encode_task_layer(feats.float()))

    # ------------------------------------------------------------------ training contract
    def forward(self, imgs: torch.Tensor, mask_ratio=None):
        """Training loss ``(loss, rec N x L x teacher_dim, ids N x L)``; ``mask_ratio`` is ignored
        (the tokenizer sees whole images) and accepted for the pre-training loop's call."""
        if self.teacher is None:
            raise MimbenchError("This VQ-KD tokenizer has no teacher, so it cannot be trained.",
                                "Set model.teacher to an encoder file (any `mimbench pretrain` output).")
        z_q, ids, loss_quant = self.encode(imgs)
        rec = self.decode(z_q)
        target = self.teacher_targets(imgs).float()
        loss_rec = (1.0 - F.cosine_similarity(rec.float(), target, dim=-1)).mean()
        stats = self.quantize.usage_stats()
        self._loss_terms = {"loss_rec": loss_rec.detach(), "loss_quant": loss_quant.detach(),
                            "codes_used": torch.tensor(stats["codes_used"]),
                            "perplexity": torch.tensor(stats["perplexity"]),
                            "codes_restarted": torch.tensor(float(self.quantize.last_restarted))}
        return loss_rec + loss_quant, rec, ids

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    def encoder_arch(self) -> dict:
        """The tokenizer's encoder ViT (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
        ``mlp_ratio``)."""
        return {k: self.config[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}

    def tokenizer_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of the exported file: the tokenizer without its teacher, detached."""
        return {k: v.detach() for k, v in self.tokenizer_state_dict().items()}

    def save(self, path, **meta) -> Path:
        """Write the tokenizer file (module docstring); ``meta`` adds string metadata (technique, data, ...)."""
        tensors = {k: v.to("cpu").contiguous().clone() for k, v in self.encoder_state_dict().items()}
        md = {str(k): str(v) for k, v in meta.items()}
        md.update(format=TOKENIZER_FORMAT, kind=self.encoder_family, config=json.dumps(self.config, sort_keys=True),
                  teacher=str(self.teacher_path or ""))
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=md), what="the tokenizer file",
                            fix="Choose an output folder you can write to, with free disk space.")

    def export(self, path, *, technique: str, config_sha256: str = "", epochs: float = 0, data: str = "",
               extra: Mapping[str, str] | None = None) -> Path:
        """The contract's export: the tokenizer file (not an encoder), ``extra`` as further metadata."""
        return self.save(path, **(extra or {}), technique=technique, config_sha256=config_sha256, epochs=epochs,
                         data=data)


# ---------------------------------------------------------------------- registry entries
PRESETS = {
    # BEiT v2's vqkd_encoder_base_decoder_3x768x12: ViT-B/16 encoder, 3-block decoder, 8192 x 32 codes.
    "vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                             decoder_depth=3, num_tokens=8192, code_dim=32),
    # Demo scale for the embedded 32x32 data: the pre-training models' 8x8 grid, 512 codes.
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                               decoder_depth=1, num_tokens=512, code_dim=32),
    # The micro size (the demo's encoders): half the width, same grid and codebook.
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                decoder_depth=1, num_tokens=512, code_dim=32),
}


@register("vqkd", technique="vqkd", model_cls=VQKD)
def vqkd(**kwargs) -> VQKD:
    """VQ-KD tokenizer from explicit constructor arguments (``teacher=<encoder file>`` to train)."""
    return VQKD(**kwargs)


def _register_presets() -> None:
    for name, preset in PRESETS.items():
        register("vqkd_" + name, technique="vqkd", model_cls=VQKD)(lambda _p=preset, **kw: VQKD(**{**_p, **kw}))


_register_presets()
