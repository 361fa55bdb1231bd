"""Masked autoencoder (MAE, He et al. 2022) with the robust-MAE recipe knobs.

``MaskedAutoencoderViT`` follows the official pre-training model numerically: same constructor
argument names, same state-dict keys (an official checkpoint's ``"model"`` dict loads with
``strict=True`` when the knobs are at their defaults), same initialisation (xavier-uniform on
every Linear and on the flattened patch-embedding kernel, normal(std 0.02) class/mask tokens,
fixed 2-D sin-cos position embeddings with a zero class position, LayerNorm 1/0), same patch
order, masking and loss. With identical weights, images and noise it returns the official loss.

Robust-MAE knobs (all off by default; this project's interpretation where the paper is silent,
see docs/techniques.md):

``decoder_attn_drop``
    dropout rate on the attention probabilities of *every* decoder block (timm's ``attn_drop``;
    active in training mode only). Encoder blocks keep attention dropout 0.
``target_norm``, ``target_norm_alpha``, ``target_norm_momentum``
    reconstruction target normalisation, see :mod:`pretrain.targets`. ``None`` means
    ``"patch"`` when ``norm_pix_loss`` else ``"none"`` (so the official flag keeps its meaning).
``mask_token_layer`` (0..depth, ``None`` = depth), ``mask_token_ratio`` (0..1)
    before encoder block ``mask_token_layer`` (i.e. after that many blocks), a learnable encoder
    mask token plus the position embedding of its patch is inserted at ``round(ratio * #masked)``
    of the masked positions, namely the masked patches with the *lowest noise* - a uniformly
    random subset that is fixed by ``noise`` like the mask itself. The inserted tokens run through
    the remaining encoder blocks; the decoder sees visible and inserted tokens (inserted ones with
    their encoder output) and its own mask token at the other masked positions. The loss still
    covers every masked position. ``(depth, 0)`` is plain MAE, bit for bit; ``(0, 1)`` a
    SimMIM/BEiT-like encoder that sees every position. The parameter ``encoder_mask_token``
    exists only when the ratio is > 0, and is not part of the exported encoder.

Reuse by subclasses (token sequences are always ``[cls, tokens in ids_shuffle order]``, i.e. the
class token followed by the first ``K`` patches of the shuffled order - visible ones first, then
inserted ones):

* ``forward_encoder(imgs, mask_ratio, noise=None, return_layers=())`` -> ``(latent, mask,
  ids_restore)``, or with ``return_layers`` ``(latent, mask, ids_restore, feats)``;
* ``forward_decoder(x, ids_restore)`` accepts any ``N x (1 + K) x embed_dim`` sequence of that
  form (``K <= L``), e.g. an intermediate encoder output, and returns ``N x L x p*p*C``;
* ``forward_target(imgs)`` -> normalised target ``N x L x p*p*C`` (updates EMA statistics in
  training mode: call once per step), ``forward_loss(imgs, pred, mask)`` -> scalar, and
  :func:`pretrain.targets.per_patch_mse` / :func:`pretrain.targets.masked_mean` for weighted losses;
* ``self._loss_terms`` (``dict[str, Tensor]``, detached) is what the ``loss_terms`` property reports,
  so a subclass's forward sets it with its own terms.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from timm.models.vision_transformer import Block, PatchEmbed

from mimbench.errors import MimbenchError
from pretrain import masking, targets
from pretrain.contract import StepContract
from pretrain.registry import register


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, ``(grid_size**2 [+1]) x embed_dim`` float32.

    Patches are in row-major order. The first half of the channels encodes the column index and
    the second half the row index (as in the official MAE code); each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (embed_dim / 4))``.
    Computed in float64 and rounded once. With ``cls_token`` a zero row is prepended.
    """
    if embed_dim % 4:
        raise MimbenchError(f"Sin-cos position embeddings need embed_dim divisible by 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # row index of patch k = k // grid_size
    cols = coords.repeat(grid_size)  # column index of patch k = k % grid_size

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


class MaskedAutoencoderViT(StepContract, nn.Module):
    """MAE with a ViT encoder and a light ViT decoder; see the module docstring.

    ``forward(imgs N x C x H x W, mask_ratio=0.75, noise=None)`` returns ``(loss, pred, mask)``:
    scalar loss (mean over masked patches of the per-patch pixel MSE), ``pred`` ``N x L x p*p*C``
    in patchified order, ``mask`` ``N x L`` with 1 = masked. ``noise`` (``N x L``) fixes the mask
    (lowest noise kept).
    """

    # pretrain.contract.PretrainModel: per-image mask noise in, a ViT-family encoder file out.
    mask_input = "noise"
    exports = "encoder"
    encoder_family = "vit"

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        *,
        decoder_attn_drop: float = 0.0,
        target_norm: str | None = None,
        target_norm_alpha: float = 0.5,
        target_norm_momentum: float = 0.99,
        mask_token_layer: int | None = None,
        mask_token_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self._check_args(img_size, patch_size, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads, depth)
        target_norm = self._resolve_target_norm(target_norm, norm_pix_loss)
        mask_token_layer = self._check_mask_tokens(mask_token_layer, mask_token_ratio, depth)
        if not 0.0 <= float(decoder_attn_drop) < 1.0:
            raise MimbenchError(f"decoder_attn_drop must be in [0, 1), got {decoder_attn_drop!r}.")

        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        self.in_chans = int(in_chans)
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.decoder_attn_drop = float(decoder_attn_drop)
        self.mask_token_layer = int(mask_token_layer)
        self.mask_token_ratio = float(mask_token_ratio)
        self.norm_pix_loss = target_norm == "patch"
        self._loss_terms: dict[str, torch.Tensor] = {}

        # Registration order matches the official model so that the state dict lists the same
        # keys in the same order and a seeded construction consumes the RNG identically.
        self._build_encoder(norm_layer)
        self._build_decoder(decoder_embed_dim, decoder_depth, decoder_num_heads, norm_layer)
        # Parameter-free unless target_norm == "ema": the default state dict stays official.
        self.target_normalizer = targets.TargetNorm(target_norm, target_norm_alpha, target_norm_momentum)
        if self.mask_token_ratio > 0:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.encoder_mask_token = None

        self.initialize_weights()

    def _build_encoder(self, norm_layer: Callable[[int], nn.Module]) -> None:
        """The official encoder modules: ``patch_embed``, ``cls_token``, ``pos_embed`` (fixed), ``blocks``, ``norm``."""
        dim = self.embed_dim
        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, self.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, self.num_heads, self.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(self.depth)]
        )
        self.norm = norm_layer(dim)

    def _build_decoder(self, dim: int, depth: int, num_heads: int, norm_layer: Callable[[int], nn.Module]) -> None:
        """The official decoder modules: ``decoder_embed``, ``mask_token``, ``decoder_pos_embed`` (fixed),
        ``decoder_blocks`` (attention dropout ``decoder_attn_drop``), ``decoder_norm``, ``decoder_pred``."""
        self.decoder_embed = nn.Linear(self.embed_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        num_positions = self.patch_embed.num_patches + 1
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_positions, dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dim, num_heads, self.mlp_ratio, qkv_bias=True, attn_drop=self.decoder_attn_drop,
                   norm_layer=norm_layer) for _ in range(depth)]
        )
        self.decoder_norm = norm_layer(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * self.in_chans, bias=True)

    @staticmethod
    def _resolve_target_norm(target_norm: str | None, norm_pix_loss: bool) -> str:
        """``None`` follows the official flag (``"patch"`` when ``norm_pix_loss``, else ``"none"``)."""
        if target_norm is None:
            return "patch" if norm_pix_loss else "none"
        if norm_pix_loss and target_norm != "patch":
            raise MimbenchError(
                f"norm_pix_loss=True conflicts with target_norm={target_norm!r}.",
                "norm_pix_loss=True is the same as target_norm='patch'; set only target_norm.",
            )
        return target_norm

    @staticmethod
    def _check_mask_tokens(mask_token_layer: int | None, mask_token_ratio: float, depth: int) -> int:
        """The insertion layer (``None`` = ``depth``), after checking it and the ratio."""
        if mask_token_layer is None:
            mask_token_layer = depth
        if not (isinstance(mask_token_layer, int) and 0 <= mask_token_layer <= depth):
            raise MimbenchError(
                f"mask_token_layer must be an integer in [0, depth={depth}], got {mask_token_layer!r}.",
                "0 inserts encoder mask tokens before the first block, depth after the last one.",
            )
        if not 0.0 <= float(mask_token_ratio) <= 1.0:
            raise MimbenchError(f"mask_token_ratio must be in [0, 1], got {mask_token_ratio!r}.")
        return mask_token_layer

    @staticmethod
    def _check_args(img_size, patch_size, embed_dim, num_heads, dec_dim, dec_heads, depth) -> None:
        if not isinstance(img_size, int) or not isinstance(patch_size, int) or img_size % patch_size:
            raise MimbenchError(
                f"img_size={img_size!r} must be an integer multiple of patch_size={patch_size!r}.",
                "MAE uses square images and a square patch grid, e.g. img_size=224, patch_size=16.",
            )
        if embed_dim % num_heads or dec_dim % dec_heads:
            raise MimbenchError(
                f"embed_dim={embed_dim} / decoder_embed_dim={dec_dim} must be divisible by "
                f"num_heads={num_heads} / decoder_num_heads={dec_heads}."
            )
        if depth < 0:
            raise MimbenchError(f"depth must be >= 0, got {depth}.")

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official MAE initialisation (see the module docstring); the encoder mask token last."""
        grid = self.img_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None]
        )
        # The patch embedding is a linear map of the flattened patch: initialise it like a Linear.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # normal(0.02) rather than a truncated normal: a cut-off at 2 (not 2 std) never triggers.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)
        if self.encoder_mask_token is not None:
            nn.init.normal_(self.encoder_mask_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ layout helpers
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``N x L x p*p*C`` (official order)."""
        return targets.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``N x L x p*p*C`` -> ``N x C x H x W``."""
        return targets.unpatchify(x, self.patch_size, self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Official-style masking of a token sequence ``x`` (``N x L x D``).

        Returns ``(x_kept N x len_keep x D, mask N x L, ids_restore N x L)``.
        """
        m = masking.random_masking(x.shape[0], x.shape[1], mask_ratio, noise, device=x.device)
        return masking.gather_tokens(x, m.ids_shuffle[:, : m.len_keep]), m.mask, m.ids_restore

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if not torch.is_tensor(imgs) or imgs.ndim != 4 or tuple(imgs.shape[1:]) != expected:
            got = tuple(imgs.shape) if torch.is_tensor(imgs) else type(imgs).__name__
            raise MimbenchError(
                f"Expected images of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), got {got}.",
                "Set the model's img_size/in_chans to match the data, or resize the images.",
            )

    # ------------------------------------------------------------------ encoder
    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        return_layers: Sequence[int] = (),
    ):
        """Encode the visible patches (plus inserted encoder mask tokens, if configured).

        Returns ``(latent, mask, ids_restore)``: ``latent`` ``N x (1 + K) x embed_dim`` after the
        final norm, tokens ``[cls, first K patches of the shuffled order]`` with
        ``K = len_keep + inserted``; ``mask`` ``N x L`` (1 = masked); ``ids_restore`` ``N x L``.
        With ``return_layers`` (block indices 0..depth-1, negatives count from the end) a fourth
        element lists the *un-normalised* output of each of those blocks, in the order given;
        blocks before ``mask_token_layer`` output ``1 + len_keep`` tokens.
        """
        self._check_imgs(imgs)
        wanted = [i + self.depth if i < 0 else i for i in return_layers]
        if any(not 0 <= i < self.depth for i in wanted):
            raise MimbenchError(f"return_layers {tuple(return_layers)} out of range for depth {self.depth}.")

        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        n, num_patches, dim = x.shape
        m = masking.random_masking(n, num_patches, mask_ratio, noise, device=x.device)
        x = masking.gather_tokens(x, m.ids_shuffle[:, : m.len_keep])

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(n, -1, -1), x), dim=1)

        n_insert = 0
        if self.encoder_mask_token is not None:
            n_insert = masking.num_inserted(num_patches - m.len_keep, self.mask_token_ratio)
        feats: dict[int, torch.Tensor] = {}
        for i in range(self.depth + 1):
            if n_insert and i == self.mask_token_layer:
                # Lowest-noise masked positions come right after the kept ones in ids_shuffle.
                ids_insert = m.ids_shuffle[:, m.len_keep : m.len_keep + n_insert]
                pos = masking.gather_tokens(self.pos_embed[:, 1:, :].expand(n, -1, -1), ids_insert)
                x = torch.cat((x, self.encoder_mask_token.expand(n, n_insert, -1) + pos), dim=1)
            if i == self.depth:
                break
            x = self.blocks[i](x)
            if i in wanted:
                feats[i] = x
        x = self.norm(x)
        if return_layers:
            return x, m.mask, m.ids_restore, [feats[i] for i in wanted]
        return x, m.mask, m.ids_restore

    # ------------------------------------------------------------------ decoder
    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decode ``x`` (``N x (1 + K) x embed_dim``, ``[cls, first K patches in shuffled order]``)
        into pixel predictions ``N x L x p*p*C``; the other ``L - K`` positions get the decoder
        mask token."""
        x = self.decoder_embed(x)
        n, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = masking.gather_tokens(x_, ids_restore)  # back to patch order
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    # ------------------------------------------------------------------ loss
    def forward_target(self, imgs: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        """Normalised reconstruction target ``N x L x p*p*C`` (``update`` defaults to training mode)."""
        return self.target_normalizer(self.patchify(imgs), update=update)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE averaged over pixels, then averaged over the masked patches only."""
        target = self.forward_target(imgs)
        return targets.masked_mean(targets.per_patch_mse(pred, target), mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        self._loss_terms = {"loss_rec": loss.detach()}
        return loss, pred, mask

    # ------------------------------------------------------------------ model contract
    # loss_terms / on_step_end / set_progress / export: pretrain.contract.StepContract (nothing is scheduled
    # per step in MAE; the EMA target statistics update in forward).
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights in timm ``VisionTransformer`` key layout (cls_token, pos_embed incl. the
        class position, patch_embed.proj.*, blocks.*, norm.*), detached copies."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def encoder_arch(self) -> dict:
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
        )

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}
        if self.encoder_mask_token is not None:
            names.add("encoder_mask_token")
        return names


# ---------------------------------------------------------------------- registry entries
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)

PRESETS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    "mae_vit_large_patch16": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    "mae_vit_huge_patch14": dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16
    ),
    # CPU-sized models for 32x32 images (8x8 patch grid).
    "mae_vit_tiny_patch4_32": dict(
        img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4
    ),
    "mae_vit_micro_patch4_32": dict(
        img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4
    ),
}

# The robust-MAE recipe defaults (this project's interpretation; docs/techniques.md explains them).
# mask_token_layer is given relative to depth: insert at the middle of the encoder.
ROBUST_RECIPE: dict = dict(
    decoder_attn_drop=0.1,
    target_norm="ema",
    target_norm_alpha=0.5,
    target_norm_momentum=0.99,
    mask_token_ratio=0.25,
)


def _build(preset: dict, kwargs: dict, recipe: dict | None = None) -> MaskedAutoencoderViT:
    args = dict(mlp_ratio=4.0, norm_layer=LayerNorm6)
    args.update(preset)
    if recipe is not None:
        args.update(recipe)
        if kwargs.get("norm_pix_loss"):
            args.pop("target_norm")
    args.update(kwargs)
    if recipe is not None and args.get("mask_token_layer") is None:
        args["mask_token_layer"] = int(args.get("depth", 24)) // 2
    return MaskedAutoencoderViT(**args)


@register("mae", technique="mae", model_cls=MaskedAutoencoderViT)
def mae(**kwargs) -> MaskedAutoencoderViT:
    """MAE from explicit official constructor arguments (+ knobs); LayerNorm eps 1e-6 unless given."""
    return _build({}, kwargs)


@register("robust_mae", technique="robust-mae", model_cls=MaskedAutoencoderViT)
def robust_mae(**kwargs) -> MaskedAutoencoderViT:
    """MAE with the robust-MAE recipe defaults (``ROBUST_RECIPE``) under explicit arguments."""
    return _build({}, kwargs, ROBUST_RECIPE)


def _register_presets() -> None:
    for name, preset in PRESETS.items():
        plain = register(name, technique="mae", model_cls=MaskedAutoencoderViT)
        plain(lambda _p=preset, **kw: _build(_p, kw))
        robust = register("robust_" + name, technique="robust-mae", model_cls=MaskedAutoencoderViT)
        robust(lambda _p=preset, **kw: _build(_p, kw, ROBUST_RECIPE))


_register_presets()
