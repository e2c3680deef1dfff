"""Sequencer: Deep LSTM for Image Classification (Tatsunami & Taki, NeurIPS 2022).

An image goes through the network like this (shapes for Sequencer2D-S at 224 px):

    image  B x 3 x 224 x 224
    stem   Conv 7x7 / 7 -> B x 32 x 32 x 192           (channels-last from here on)
    stage 1: 4 x SequencerBlock                        B x 32 x 32 x 192
    stage 2: Conv 2x2 / 2, 3 x SequencerBlock          B x 16 x 16 x 384
    stage 3: Conv 1x1,     8 x SequencerBlock          B x 16 x 16 x 384
    stage 4: Conv 1x1,     3 x SequencerBlock          B x 16 x 16 x 384
    head   LayerNorm -> mean over H, W -> Linear       B x num_classes

Each block is pre-norm and residual (Sec. 3.2, Fig. 2):
    x = x + DropPath(BiLSTM2D(LN(x)));  x = x + DropPath(MLP(LN(x)))
BiLSTM2D runs a BiLSTM down every column and one along every row, concatenates the four directions
per position and fuses the channels with a Linear layer. The recurrences themselves run in
``seqvision.ops.rnn2d`` (reference nn.LSTM path or the fused engine, same interface).

The vanilla Sequencer (Sec. 3.1) uses one BiLSTM over the raster-flattened tokens instead.
Parameter names follow timm's port (``stages.{i}.blocks.{j}``), so timm checkpoints load as they are;
``seqvision.weights`` converts the authors' layout (``blocks.{i}.{j}``).
"""

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import named_apply
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..errors import InputError
from .token_mixers import BiLSTM1D, BiLSTM2D

# The blocks' norms: nn.LayerNorm, except on the GPU engine, where each is one Triton pass (ops/layer_norm.py).
LayerNorm = partial(ops.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv(k = s = patch) on NCHW, output channels-last (B x H x W x C)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # A channels-last input makes the conv's output channels-last too, so the B x H x W x C view below is
        # already contiguous (.contiguous() is then free). A strided stream would make every LayerNorm and
        # residual add of every stage take a slow strided kernel.
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1).contiguous()


class Downsample(nn.Module):
    """Between stages: Conv(k = s = patch) on a channels-last map (patch 2, then the 1x1 "pointwise linear")."""

    def __init__(self, dim: int, dim_out: int, patch_size: int):
        super().__init__()
        self.down = nn.Conv2d(dim, dim_out, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()  # see PatchEmbed


class ChannelMlp(nn.Module):
    """Channel mixing: Linear -> GELU -> Linear (the parameter names of timm's Mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_gelu(self.fc1(x), self.act.approximate))


@torch.fx.wrap  # one node in FX graphs: the in-place choice is made at run time, as in eager mode
def _gelu(h: Tensor, approximate: str) -> Tensor:
    """GELU. Without autograd nothing needs its input, so it is overwritten: one hidden-size tensor (3x the
    block's) less at the inference peak (benchmarks/RESULTS.md)."""
    if torch.is_grad_enabled():
        return F.gelu(h, approximate=approximate)
    return torch.ops.aten.gelu_(h, approximate=approximate)


class SequencerBlock(nn.Module):
    """Pre-norm residual block: token mixing by an RNN, channel mixing by an MLP (Eq. 1-2 of Fig. 2)."""

    def __init__(self, dim: int, token_mixer: nn.Module, mlp_ratio: float = 3.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.rnn_tokens = token_mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp_channels = ChannelMlp(dim, int(mlp_ratio * dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.rnn_tokens(self.norm1(x)))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class SequencerStage(nn.Module):
    """An optional downsampler followed by ``len(blocks)`` SequencerBlocks at one resolution."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return self._checkpointed(x)
        return self.blocks(x)

    @torch.jit.unused
    def _checkpointed(self, x: Tensor) -> Tensor:
        """Recompute each block's activations in backward instead of storing them."""
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


POOL_TYPES = ("avg", "")  # timm's global_pool values that apply: average over H and W, or none


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be 'avg' (mean over H and W) or '' (no pooling), not {global_pool!r}")
    return global_pool


class ClassifierHead(nn.Module):
    """Global average pool over H and W (``pool_type="avg"``; ``""`` keeps the B x H x W x C map), dropout,
    Linear."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        self.pool_type = _check_pool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.pool_type == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


def _init_weights(module: nn.Module, name: str) -> None:
    """The authors' initialisation (Sec. 4.1 / their code)."""
    if isinstance(module, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if "mlp" in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.RNNBase):
        bound = 1.0 / math.sqrt(module.hidden_size)
        for p in module.parameters():
            nn.init.uniform_(p, -bound, bound)


class Sequencer(nn.Module):
    """Sequencer2D (``mixer="2d"``, the paper's main model) or the vanilla Sequencer (``mixer="1d"``)."""

    def __init__(
        self,
        layers: Sequence[int] = (4, 3, 8, 3),
        patch_sizes: Sequence[int] = (7, 2, 1, 1),
        embed_dims: Sequence[int] = (192, 384, 384, 384),
        hidden_sizes: Sequence[int] = (48, 96, 96, 96),
        mlp_ratio: float = 3.0,
        mixer: str = "2d",
        cell: str = "lstm",
        bidirectional: bool = True,
        union: str = "cat",
        with_fc: bool = True,
        pos_embed: bool = False,
        shuffle_tokens: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "linear",
    ):
        super().__init__()
        if not len(layers) == len(patch_sizes) == len(embed_dims) == len(hidden_sizes):
            raise ValueError("layers, patch_sizes, embed_dims and hidden_sizes need one entry per stage")
        if mixer not in ("1d", "2d"):
            raise ValueError(f"unknown mixer {mixer!r}; choose '2d' (Sequencer2D) or '1d' (vanilla)")
        if drop_path_schedule not in ("linear", "constant"):
            raise ValueError("drop_path_schedule must be 'linear' (authors) or 'constant' (timm's port)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = _pair(img_size)
        self.global_pool = _check_pool(global_pool)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        # forward_features (and every stage) returns B x H x W x C: channels on the last axis, as timm declares it.
        self.output_fmt = "NHWC"
        self.feature_dim = -1
        self.min_input_size = math.prod(patch_sizes)
        self.shuffle_tokens = shuffle_tokens

        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_sizes[0])
        if pos_embed:
            grid = _pair(img_size)
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, grid[0] // patch_sizes[0], grid[1] // patch_sizes[0], embed_dims[0])
            )
        else:
            self.absolute_pos_embed = None

        # Stochastic depth: the authors' linear rule, block k of N gets rate * k / (N - 1).
        n_blocks = sum(layers)
        if drop_path_schedule == "linear":
            rates = [drop_path_rate * k / max(n_blocks - 1, 1) for k in range(n_blocks)]
        else:
            rates = [drop_path_rate] * n_blocks

        def token_mixer(dim: int, hidden: int) -> nn.Module:
            if mixer == "1d":
                return BiLSTM1D(dim, hidden, cell, bidirectional)
            return BiLSTM2D(dim, hidden, cell, bidirectional, union, with_fc)

        stages, k, reduction, prev_dim = [], 0, 1, embed_dims[0]
        self.feature_info = []
        for i, (depth, dim, hidden) in enumerate(zip(layers, embed_dims, hidden_sizes, strict=True)):
            down = Downsample(prev_dim, dim, patch_sizes[i]) if i > 0 else nn.Identity()
            blocks = [SequencerBlock(dim, token_mixer(dim, hidden), mlp_ratio, rates[k + j]) for j in range(depth)]
            stages.append(SequencerStage(down, blocks))
            k, prev_dim, reduction = k + depth, dim, reduction * patch_sizes[i]
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        # Plain nn.LayerNorm: forward_features keeps timm's output dtype under autocast (fp32).
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head = ClassifierHead(embed_dims[-1], num_classes, drop_rate, global_pool)
        self.init_weights()

    def init_weights(self) -> None:
        named_apply(_init_weights, self)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)

    # -- timm-style interface -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's optimiser factory reads this)."""
        return dict(
            stem=r"^stem|^absolute_pos_embed",
            blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))]
            if coarse
            else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"} if self.absolute_pos_embed is not None else set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (zero-initialised, as the authors do for transfer); ``global_pool=""`` makes
        ``forward`` return the unpooled B x H x W x C map (timm's convention), ``"avg"`` pools again."""
        if global_pool is not None:
            self.global_pool = self.head.pool_type = _check_pool(global_pool)
        self.num_classes = num_classes
        device = self.stem.proj.weight.device
        self.head.fc = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head.fc.weight)
            nn.init.zeros_(self.head.fc.bias)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.stem(_check_images(x, self.in_chans, self.min_input_size))
        if self.absolute_pos_embed is not None:
            x = _add_pos_embed(x, self.absolute_pos_embed)
        if self.shuffle_tokens and self.training:
            # Ablation (Sec. 4.4): one random order of the token positions per batch, training only.
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)[:, torch.randperm(H * W, device=x.device)].reshape(B, H, W, C)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B x C x H x W) -> normalised last-stage features, channels-last (B x h x w x C)."""
        x = self._embed(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs as well as the final features (timm's interface).

        ``indices``: the last n stages if an int, all if None, else the stage indices to return.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NHWC'")
        take = _take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max(take) + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        x = self._embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) that the requested intermediates do not need; returns their indices.
        As in timm, the pruned head neither pools nor classifies: ``forward`` then returns the last kept map."""
        take = _take_indices(len(self.stages), indices)
        keep = max(take) + 1
        pruned_end = keep < len(self.stages)
        self.stages = self.stages[:keep]
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[keep - 1]["num_chs"]
        if prune_head or pruned_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes, self.global_pool = 0, ""
        return take

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Make ``img_size`` the size the model is meant for (timm's API): ``pretrained_cfg``, which
        ``timm.data.resolve_data_config`` reads, and the learned position embedding (``v_sequencer_s_pe``), which is
        resampled to the new grid once here instead of at every call. Inputs of any size still run."""
        size = _pair(img_size)
        if min(size) < self.min_input_size:
            raise InputError(f"img_size {size} is below this model's smallest input, {self.min_input_size} pixels")
        if self.absolute_pos_embed is not None:
            patch = self.stem.proj.kernel_size
            grid = (size[0] // patch[0], size[1] // patch[1])
            with torch.no_grad():
                pe = _resample_grid(self.absolute_pos_embed.detach(), list(grid))
            self.absolute_pos_embed = nn.Parameter(pe, requires_grad=self.absolute_pos_embed.requires_grad)
        self.img_size = size
        cfg = getattr(self, "pretrained_cfg", None)
        if cfg is not None:
            cfg["input_size"] = (cfg["input_size"][0], *size)
            cfg["pool_size"] = (size[0] // self.min_input_size, size[1] // self.min_input_size)


# -- Steps of the forward pass kept as one node each in FX graphs (they look at shapes or the autograd state,
# which an FX proxy cannot answer at trace time); TorchScript compiles them as they are.
@torch.fx.wrap
def _check_images(x: Tensor, in_chans: int, min_size: int) -> Tensor:
    """``x`` itself if it is a batch of images this model can take; else an InputError that says what to change."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise InputError(f"expected images of shape (batch, {in_chans}, height, width), got {list(x.shape)}")
    if not x.is_floating_point():
        raise InputError(
            f"expected a floating-point image tensor, got {x.dtype}: scale to [0, 1] and normalise with the "
            "model's mean / std first (timm.data.resolve_data_config(model=model) gives them)"
        )
    h, w = x.shape[2], x.shape[3]
    if h < min_size or w < min_size:
        raise InputError(
            f"input of {h}x{w} pixels is too small: this model needs at least "
            f"{min_size}x{min_size} (its patch sizes multiply to {min_size})"
        )
    return x


def _resample_grid(pe: Tensor, grid: list[int]) -> Tensor:
    """A 1 x h x w x C learned grid resampled (bicubic) to ``grid``."""
    pe = F.interpolate(pe.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1)


@torch.fx.wrap
def _add_pos_embed(x: Tensor, pe: Tensor) -> Tensor:
    """``x + pe``, the grid resampled to ``x``'s when the input size differs. When compiling or exporting it is always
    resampled (an identity at the same size) so that the graph does not specialise on the image size."""
    if (not torch.jit.is_scripting() and torch.compiler.is_compiling()) or pe.shape[1:3] != x.shape[1:3]:
        pe = _resample_grid(pe, x.shape[1:3])
    return x + pe


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"can take the last 1..{n} stages, not {indices}")
        return list(range(n - indices, n))
    take = [i % n if -n <= i < n else i for i in indices]
    bad = [i for i in take if not 0 <= i < n]
    if bad:
        raise ValueError(f"stage indices {bad} out of range: the model has {n} stages")
    return take


# -- Variants (Table 1 and the ablations of Sec. 4.4, from the authors' code) -------------------------
_S = dict(layers=(4, 3, 8, 3), patch_sizes=(7, 2, 1, 1), embed_dims=(192, 384, 384, 384), hidden_sizes=(48, 96, 96, 96))
_M = dict(_S, layers=(4, 3, 14, 3))
_L = dict(_S, layers=(8, 8, 16, 4))
_H2X = (96, 192, 192, 192)
_V = dict(layers=(4, 3, 8, 3), patch_sizes=(14, 1, 1, 1), embed_dims=(384,) * 4, hidden_sizes=(192,) * 4, mixer="1d")

VARIANTS: dict[str, dict] = {
    "sequencer2d_s": _S,
    "sequencer2d_m": _M,
    "sequencer2d_l": _L,
    "sequencer2d_s_392": dict(_S, img_size=392),
    "sequencer2d_m_392": dict(_M, img_size=392),
    "sequencer2d_l_392": dict(_L, img_size=392),
    "sequencer2d_s_unidirectional": dict(_S, bidirectional=False),
    "sequencer2d_s_add": dict(_S, union="add"),
    "sequencer2d_s_h2x": dict(_S, hidden_sizes=_H2X),
    "sequencer2d_s_without_fc": dict(_S, with_fc=False),
    "sequencer2d_s_vertical": dict(_S, hidden_sizes=_H2X, union="vertical", with_fc=False),
    "sequencer2d_s_horizontal": dict(_S, hidden_sizes=_H2X, union="horizontal", with_fc=False),
    "gru_sequencer2d_s": dict(_S, cell="gru"),
    "rnn_sequencer2d_s": dict(_S, cell="rnn"),
    "sequencer2d_l_d4_3x": dict(_L, embed_dims=(256, 512, 512, 512), hidden_sizes=(64, 128, 128, 128)),
    "v_sequencer_s": _V,
    "v_sequencer_s_h": dict(_S, hidden_sizes=_H2X, mixer="1d"),
    "v_sequencer_s_pe": dict(_V, pos_embed=True),
}

# The authors' own names, accepted as aliases.
ALIASES = {"sequencer2d_vertical": "sequencer2d_s_vertical"}

# Released ImageNet-1K weights (the authors' GitHub release, 224 px).
_RELEASE = "https://github.com/okojoalg/sequencer/releases/download/weights/{}.pth"
PRETRAINED_URLS = {name: _RELEASE.format(name) for name in ("sequencer2d_s", "sequencer2d_m", "sequencer2d_l")}


def pretrained_cfg_for(
    name: str, num_classes: int = 1000, img_size: int | tuple[int, int] | None = None, reduction: int | None = None
) -> dict:
    """Preprocessing and metadata in timm's pretrained_cfg format (timm.data.resolve_data_config reads it).
    ``reduction``: the model's total stride (its patch sizes multiplied; the variant's by default), which gives
    ``pool_size``, the size of the final feature map at ``img_size``."""
    native = 392 if name.endswith("_392") else 224
    size = _pair(img_size) if img_size is not None else (native, native)
    reduction = reduction or math.prod(VARIANTS[name]["patch_sizes"])
    return {
        "architecture": name,
        "url": PRETRAINED_URLS.get(name, ""),
        "num_classes": num_classes,
        "input_size": (3, *size),
        "crop_pct": 1.0 if native == 392 else 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.proj",
        "classifier": "head.fc",
        "pool_size": (size[0] // reduction, size[1] // reduction),
        # Every variant runs at any size (v_sequencer_s_pe resamples its position embedding), so none is fixed.
        "fixed_input_size": False,
    }
