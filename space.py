"""The AutoFormer search space (Chen et al., ICCV 2021) written with NNI 3.0 mutables.

One supernet holds every vision transformer of the space; a subnet uses the leading slices of
the largest weights ("weight entanglement"). Four dimensions are searched: ``embed_dim``,
``depth``, and per layer ``mlp_ratio_{i}`` and ``num_head_{i}`` (head dim fixed at 64).

Layouts:

- supernet (this project): the state dict of ``RandomOneShot().mutate_model(AutoformerSpace(...))``.
  ``blocks.blocks.{i}.attn.qkv`` keeps the official AutoFormer layout, which NNI's built-in
  mixed operations cannot slice (see :class:`MixedQKV`).
- subnet: the state dict of ``space.freeze(arch)``, a plain ViT whose ``qkv`` rows are q; k; v.

This file owns the presets and AutoFormer-T/S/B, the blocks and fast ops, ``AutoformerSpace``,
supernet build and arch activation, the arch helpers, parameter / FLOPs counting and
``sub_state_dict``. It imports nothing from this project: copy it alone into other code. Reading
and writing weights files is ``checkpoints.py``'s; the ``load_*`` classmethods reach it lazily.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

with warnings.catch_warnings():  # NNI 3.0 predates torch 2.14: one harmless warning per torch class it does not know
    warnings.filterwarnings('ignore', message=r'.*is found to be not a nn\.Module', category=RuntimeWarning)
    import nni
    from nni.mutable import MutableExpression
    from nni.nas.hub.pytorch.autoformer import (AbsolutePositionEmbedding, ClassToken, MixedAbsolutePositionEmbedding,
                                                MixedClassToken)
    from nni.nas.nn.pytorch import (ModelSpace, MutableConv2d, MutableLayerNorm, MutableLinear, ParametrizedModule,
                                    Repeat)
    from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
    from nni.nas.oneshot.pytorch.supermodule.operation import MixedLinear, MixedOperation
    from nni.nas.space import model_context

class _DropMixedOpNestedMutableWarning(logging.Filter):
    """NNI's own mixed class token / position embedding warn about their constructor on every mutation."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ('Found a nested mutable' in message and 'of class Mixed' in message)


logging.getLogger('nni.nas.nn.pytorch.base').addFilter(_DropMixedOpNestedMutableWarning())


__all__ = ['AutoformerSpace', 'SpaceError', 'PRESETS', 'SEARCHED', 'DEFAULTS', 'build_supernet', 'set_active_arch',
           'complete_space_kwargs', 'space_problem', 'make_arch', 'arch_choices', 'sample_arch', 'extreme_arch',
           'canonical_arch', 'typed_arch', 'check_arch', 'complete_arch', 'layer_dims', 'count_params', 'count_flops',
           'sub_state_dict', 'inherited_subnet', 'preset_name', 'init_weights']


class SpaceError(ValueError):
    """An arch or space argument that does not fit the space; the message names the label and what is allowed."""


HEAD_DIM = 64
# Device types whose attention runs through F.scaled_dot_product_attention (Attention.fused): on CUDA its
# flash / memory-efficient kernels keep no N x N tensor. Elsewhere the explicit matmuls, faster on the CPU
# (bench/train_step.py --attention).
SDPA_DEVICES = {'cuda'}

PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(search_embed_dim=(192, 216, 240), search_mlp_ratio=(3.0, 3.5, 4.0),
                 search_num_heads=(3, 4), search_depth=(12, 13, 14)),
    'small': dict(search_embed_dim=(320, 384, 448), search_mlp_ratio=(3.0, 3.5, 4.0),
                  search_num_heads=(5, 6, 7), search_depth=(12, 13, 14)),
    'base': dict(search_embed_dim=(528, 576, 624), search_mlp_ratio=(3.0, 3.5, 4.0),
                 search_num_heads=(8, 9, 10), search_depth=(14, 15, 16)),
    # Sized for a laptop CPU and the bundled 32 px digits; the space of the golden official cases.
    'demo': dict(search_embed_dim=(96, 112, 128), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(1, 2),
                 search_depth=(2, 3, 4), img_size=32, patch_size=8, num_labels=10),
    # Sized for 28 px images (Fashion-MNIST) on a CPU: 7-pixel patches, a 4x4 grid (4-pixel patches learn no
    # faster per image and run 3x slower). From 0.04M to 1.09M parameters. With embed 32 at the bottom the largest
    # subnet scored 88.20% (30 epochs) instead of 88.57% (26; one run each); depth 2-4 put every subnet within
    # 1.7 test points, too close for any search to tell apart.
    'fashion': dict(search_embed_dim=(64, 96, 128), search_mlp_ratio=(1.0, 2.0, 4.0), search_num_heads=(1, 2, 4),
                    search_depth=(1, 2, 3, 4), img_size=28, patch_size=7, num_labels=10),
}
SEARCH_KEYS = ('search_embed_dim', 'search_mlp_ratio', 'search_num_heads', 'search_depth')

# AutoFormer-T/S/B as released (embed_dim, per-layer mlp ratios, per-layer heads).
SEARCHED = {
    'tiny': (192, [3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4.0, 4.0, 3.5, 4.0, 3.5, 4.0, 3.5],
             [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 3, 3]),
    'small': (384, [3.0, 3.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.5, 4.0],
              [6, 6, 5, 7, 5, 5, 5, 6, 6, 7, 7, 6, 7]),
    'base': (576, [3.5, 3.5, 4.0, 3.5, 4.0, 3.5, 3.5, 3.0, 4.0, 4.0, 3.0, 4.0, 3.0, 3.5],
             [9, 9, 9, 9, 9, 10, 9, 9, 10, 9, 10, 9, 9, 10]),
}

DEFAULTS: dict[str, Any] = dict(
    search_embed_dim=(192, 216, 240), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(3, 4),
    search_depth=(12, 13, 14), img_size=224, patch_size=16, in_channels=3, num_labels=1000, qkv_bias=True,
    drop_rate=0., attn_drop_rate=0., drop_path_rate=0.1, pre_norm=True, global_pooling=True,
    absolute_position=True, qk_scale=None, rpe=True, rpe_length=None,
)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

class MutableQKV(ParametrizedModule, nn.Linear, wraps=nn.Linear):
    """The q, k, v projection. Frozen, it is a plain ``nn.Linear`` whose output rows are q; k; v.

    In the supernet (:class:`MixedQKV`) its weight rows are interleaved and its bias is not,
    exactly as the official ``qkv_super``.
    """


def official_qkv_slice(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                       out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The subnet's (q; k; v) weight and bias from an official-layout supernet qkv.

    Weight rows are interleaved (q, k, v, q, k, v, ...) over the first ``out_features`` rows;
    the bias is the contiguous prefix ``bias[:out_features]``, split in three by the caller.
    """
    rows = weight[:out_features, :in_features]
    weight = torch.cat([rows[0::3], rows[1::3], rows[2::3]])
    return weight, None if bias is None else bias[:out_features]


class MixedPrefixLinear(MixedLinear):
    """NNI's ``MixedLinear`` (the leading rows and columns of the weight) with :class:`SlicedLinear`."""

    def forward_with_args(self, in_features, out_features, inputs: torch.Tensor) -> torch.Tensor:
        if not (isinstance(in_features, int) and isinstance(out_features, int)):  # differentiable one-shot
            return super().forward_with_args(in_features, out_features, inputs)
        return SlicedLinear.apply(inputs, self.weight, self.bias, out_features, in_features)


class MixedQKV(MixedOperation, nn.Linear):
    """One-shot version of :class:`MutableQKV`: slices the largest qkv the way the official code does.

    NNI's ``MixedLinear`` takes prefixes of rows, which is right for the weight only after
    de-interleaving and never right for the bias of a subnet with fewer heads than the maximum.
    """
    bound_type = MutableQKV
    argument_list = ['in_features', 'out_features']

    def super_init_argument(self, name: str, value_choice: MutableExpression) -> int:
        return max(value_choice.grid())

    def freeze_weight(self, in_features: int, out_features: int, **kwargs) -> dict[str, torch.Tensor | None]:
        weight, bias = official_qkv_slice(self.weight, self.bias, in_features, out_features)
        return {'weight': weight, 'bias': bias}

    def forward_with_args(self, in_features: int, out_features: int, inputs: torch.Tensor) -> torch.Tensor:
        return SlicedLinear.apply(inputs, self.weight, self.bias, qkv_rows(out_features, inputs.device), in_features)


class RelativePosition2D(nn.Module):
    """AutoFormer's 2-D relative position encoding, computed without N x N x head_dim tensors.

    Plainly: ``r(i, j) = table_v[dv(i, j)] + table_h[dh(i, j)]``, added to the keys' logits as ``q_i . r(i, j)`` and
    to the values as ``sum_j attn_ij r(i, j)``. A token pair's encoding is ``table_v[dv] + table_h[dh]`` with dv, dh
    the clipped row and column distances (row 0 of each table is for pairs with the class token). Every key of one
    grid row shares dv and of one grid column dh, so the encoding of key j is picked by a fixed 0/1 vector ``e_j``
    (its class / row / column bucket) and each query's table row per bucket:

    * keys: ``q . r(i, j) = a_i . e_j`` where ``a_i`` gathers ``q_i . table`` per bucket, so the
      logits are one matmul ``[q, a] @ [k, e]^T``;
    * values: ``attn @ [v, e]`` gives, next to ``attn @ v``, the attention summed per bucket,
      which is scattered to table rows and multiplied by the small tables.

    Outputs equal the direct formulation (``bench/reference.py``) up to float rounding.
    """

    def __init__(self, head_dim: int, length: int) -> None:
        super().__init__()
        self.length = length
        self.embeddings_table_v = nn.Parameter(torch.empty(2 * length + 2, head_dim))
        self.embeddings_table_h = nn.Parameter(torch.empty(2 * length + 2, head_dim))
        nn.init.trunc_normal_(self.embeddings_table_v, std=.02)
        nn.init.trunc_normal_(self.embeddings_table_h, std=.02)
        self._bucket_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def buckets(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(members, rows)`` for the 2 + 2 * side buckets of an N-token input, built once per size and device.

        Buckets: class token (vertical table), grid rows, class token (horizontal table), grid
        columns. ``members`` (N, buckets) is 1 where key j falls in a bucket; ``rows`` (N, buckets)
        is the row of the stacked ``[table_v; table_h]`` that query i uses for a bucket. Empty
        buckets pad head_dim + buckets to a multiple of 8, which BLAS runs faster (``bench/kernels.py``).
        """
        if torch.compiler.is_compiling():  # in the graph: a cache would make dynamo guard on it and compile twice
            return self._make_buckets(num_tokens, device)
        key = (num_tokens, device)
        if key not in self._bucket_cache:
            self._bucket_cache[key] = self._make_buckets(num_tokens, device)
        return self._bucket_cache[key]

    def _make_buckets(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        side = math.isqrt(num_tokens - 1)
        if side * side != num_tokens - 1:
            raise ValueError(f'relative position encoding needs a square patch grid, got {num_tokens - 1} patches')
        patch = torch.arange(num_tokens - 1, device=device)
        grid = torch.arange(side, device=device)
        one_hot = torch.eye(side, device=device)
        members = torch.zeros(num_tokens, 2 + 2 * side, device=device)
        members[0, 0] = members[0, 1 + side] = 1
        members[1:, 1:1 + side] = one_hot[patch // side]
        members[1:, 2 + side:] = one_hot[patch % side]
        table_rows = self.embeddings_table_v.shape[0]
        zero = torch.zeros(num_tokens, 1, dtype=torch.long, device=device)
        rows = torch.cat([zero, self._clipped(grid, patch // side), zero + table_rows,
                          self._clipped(grid, patch % side) + table_rows], dim=1)
        padding = -(self.embeddings_table_v.shape[1] + members.shape[1]) % 8
        return F.pad(members, (0, padding)), F.pad(rows, (0, padding))

    def _clipped(self, grid: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        index = (grid[None, :] - query[:, None]).clamp(-self.length, self.length) + self.length + 1
        return F.pad(index, (0, 0, 1, 0))  # the class-token query uses row 0 for every key

    def table(self) -> torch.Tensor:
        return torch.cat([self.embeddings_table_v, self.embeddings_table_h])

    def query_columns(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``[scale q, a]``: the queries beside their table terms per bucket, so that ``[scale q, a] @ [k, e]^T``
        are the logits (B, H, N, d) -> (B, H, N, d + buckets)."""
        q = q * scale  # on N x d rather than N x N
        _, rows = self.buckets(q.shape[-2], q.device)
        per_bucket = (q @ self.table().t()).gather(-1, rows.expand(*q.shape[:-1], rows.shape[-1]))
        return torch.cat([q, per_bucket.to(q.dtype)], dim=-1)

    def logits(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale * (q . k + q . r(i, j))`` for every query i and key j: (B, H, N, d) x 2 -> (B, H, N, N)."""
        members, _ = self.buckets(q.shape[-2], q.device)
        return matmul_with_bucket_columns(self.query_columns(q, scale), k, members, True)

    def attend(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``sum_j attn(i, j) (v_j + r(i, j))``: (B, H, N, N), (B, H, N, d) -> (B, H, N, d)."""
        members, _ = self.buckets(attn.shape[-1], attn.device)
        return self.values(matmul_with_bucket_columns(attn, v, members, False), v.shape[-1])

    def key_columns(self, k: torch.Tensor) -> torch.Tensor:
        """``[k, e]``: keys (or values) beside their 0/1 bucket columns, (B, H, N, d) -> (B, H, N, d + buckets)."""
        return with_bucket_columns(k, self.buckets(k.shape[-2], k.device)[0])

    def values(self, attended: torch.Tensor, width: int) -> torch.Tensor:
        """``attn @ [v, e]`` -> ``sum_j attn(i, j) (v_j + r(i, j))``: the per-bucket sums through the table."""
        _, rows = self.buckets(attended.shape[-2], attended.device)
        out, per_bucket = attended.split([width, attended.shape[-1] - width], dim=-1)
        table = self.table()
        per_row = per_bucket.new_zeros(*per_bucket.shape[:-1], table.shape[0])
        per_row = per_row.scatter_add(-1, rows.expand(*per_bucket.shape[:-1], rows.shape[-1]), per_bucket)
        return out + per_row @ table.to(per_row.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fixed head dim; the head count follows from the qkv width.

    Per head, with ``r_k``, ``r_v`` the relative position encodings of :class:`RelativePosition2D`:
    ``attn = softmax(scale * (q_i . k_j + q_i . r_k(i, j)))`` and ``out_i = sum_j attn_ij (v_j + r_v(i, j))``.
    ``fused`` (SDPA, on CUDA) and ``explicit`` compute exactly this; neither builds the N x N x head_dim tensors.
    """

    def __init__(self, embed_dim, num_heads, qkv_bias: bool, qk_scale: float | None, attn_drop: float,
                 proj_drop: float, rpe: bool, rpe_length: int) -> None:
        super().__init__()
        self.scale = qk_scale or HEAD_DIM ** -0.5
        self.qkv = MutableQKV(in_features=embed_dim, out_features=num_heads * 3 * HEAD_DIM, bias=qkv_bias)
        self.proj = MutableLinear(in_features=num_heads * HEAD_DIM, out_features=embed_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = rpe
        if rpe:
            self.rel_pos_embed_k = RelativePosition2D(HEAD_DIM, rpe_length)
            self.rel_pos_embed_v = RelativePosition2D(HEAD_DIM, rpe_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, -1, HEAD_DIM).permute(2, 0, 3, 1, 4)
        if x.device.type in SDPA_DEVICES and not torch.jit.is_tracing():
            out = self.fused(q, k, v)
        else:
            out = self.explicit(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))

    def fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` over ``[scale q, a]``, ``[k, e]`` and ``[v, e]``: the relative
        positions as extra columns, so flash or memory-efficient kernels serve it and no N x N tensor is kept."""
        dropout = self.attn_drop.p if self.training else 0.0
        if not self.rpe:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        out = F.scaled_dot_product_attention(self.rel_pos_embed_k.query_columns(q, self.scale),
                                             self.rel_pos_embed_k.key_columns(k),
                                             self.rel_pos_embed_v.key_columns(v), dropout_p=dropout, scale=1.0)
        return self.rel_pos_embed_v.values(out, v.shape[-1])

    def explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention matrix written out (the official formulation's shape of computation)."""
        if self.rpe:
            attn = self.rel_pos_embed_k.logits(q, k, self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.rel_pos_embed_v.attend(attn, v) if self.rpe else attn @ v


class Block(nn.Module):
    """Transformer encoder layer; pre-norm (or post-norm), drop path on both residual branches."""

    def __init__(self, embed_dim, num_heads, mlp_ratio, drop_path: float, drop_rate: float, pre_norm: bool,
                 **attn_kwargs) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn_layer_norm = MutableLayerNorm(embed_dim)
        self.attn = Attention(embed_dim, num_heads, proj_drop=drop_rate, **attn_kwargs)
        self.ffn_layer_norm = MutableLayerNorm(embed_dim)
        hidden = MutableExpression.to_int(embed_dim * mlp_ratio)
        self.fc1 = MutableLinear(in_features=embed_dim, out_features=hidden)
        self.fc2 = MutableLinear(in_features=hidden, out_features=embed_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.attn_layer_norm, self.attn)
        return self._residual(x, self.ffn_layer_norm, self.mlp)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))

    def _residual(self, x: torch.Tensor, norm: nn.Module, branch) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop_path(branch(norm(x)))
        return norm(x + self.drop_path(branch(x)))


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------

class AutoformerSpace(ModelSpace):
    """The AutoFormer space. Constructor keywords follow NNI's hub ``AutoFormer`` (plus ``rpe_length``).

    Train it with ``RandomOneShot`` (weight entanglement), search it with any strategy; an
    ``arch`` is a dict with ``embed_dim``, ``depth``, ``mlp_ratio_{i}`` and ``num_head_{i}``.

    Parameters
    ----------
    search_embed_dim : the candidate embedding widths (one per subnet, shared by its layers).
    search_mlp_ratio : the candidate MLP hidden / embedding ratios (one per layer).
    search_num_heads : the candidate head counts (one per layer; every head is 64 wide).
    search_depth : the candidate depths (layers past a subnet's depth are skipped).
    img_size : the input's side in pixels; a multiple of ``patch_size``.
    patch_size : the side of the square patches the convolutional stem embeds.
    in_channels : the input's channels.
    num_labels : the classes of the head (0: no head, the pooled features come out).
    qkv_bias : whether the q / k / v projection has a bias.
    drop_rate : dropout after the position embedding and in the MLPs.
    attn_drop_rate : dropout of the attention weights.
    drop_path_rate : stochastic depth of the deepest layer (linear from 0 at the first).
    pre_norm : LayerNorm before attention and MLP (and a final LayerNorm), as the official code.
    global_pooling : mean of the patch tokens as the feature, else the class token.
    absolute_position : a learned absolute position embedding besides the relative one.
    qk_scale : the attention scale (default ``head_dim ** -0.5``).
    rpe : 2-D relative position encoding of keys and values (AutoFormer's).
    rpe_length : the clip distance of the relative positions (default ``img_size // patch_size``).
    """

    def __init__(
        self,
        search_embed_dim: tuple[int, ...] = (192, 216, 240),
        search_mlp_ratio: tuple[float, ...] = (3.0, 3.5, 4.0),
        search_num_heads: tuple[int, ...] = (3, 4),
        search_depth: tuple[int, ...] = (12, 13, 14),
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_labels: int = 1000,
        qkv_bias: bool = True,
        drop_rate: float = 0.,
        attn_drop_rate: float = 0.,
        drop_path_rate: float = 0.1,
        pre_norm: bool = True,
        global_pooling: bool = True,
        absolute_position: bool = True,
        qk_scale: float | None = None,
        rpe: bool = True,
        rpe_length: int | None = None,
    ) -> None:
        super().__init__()
        self.space_kwargs = complete_space_kwargs(**{k: v for k, v in locals().items() if k in DEFAULTS})
        rpe_length = self.space_kwargs['rpe_length']
        max_depth = max(search_depth)
        embed_dim = nni.choice('embed_dim', list(search_embed_dim))
        depth = nni.choice('depth', list(search_depth))
        mlp_ratios = [nni.choice(f'mlp_ratio_{i}', list(search_mlp_ratio)) for i in range(max_depth)]
        num_heads = [nni.choice(f'num_head_{i}', list(search_num_heads)) for i in range(max_depth)]

        self.patch_embed = MutableConv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.global_pooling = global_pooling
        self.cls_token = ClassToken(embed_dim)
        self.pos_embed = AbsolutePositionEmbedding(self.num_patches + 1, embed_dim) if absolute_position \
            else nn.Identity()
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = [drop_path_rate * i / max(max_depth - 1, 1) for i in range(max_depth)]  # stochastic depth rule
        self.blocks = Repeat(lambda i: Block(
            embed_dim, num_heads[i], mlp_ratios[i], drop_path=drop_paths[i], drop_rate=drop_rate, pre_norm=pre_norm,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop_rate, rpe=rpe, rpe_length=rpe_length,
        ), depth)
        self.norm = MutableLayerNorm(embed_dim) if pre_norm else nn.Identity()
        self.head = MutableLinear(in_features=embed_dim, out_features=num_labels) if num_labels > 0 \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.pos_drop(self.pos_embed(self.cls_token(x)))
        x = self.norm(self.blocks(x))
        x = x[:, 1:].mean(dim=1) if self.global_pooling else x[:, 0]
        return self.head(x)

    @classmethod
    def extra_oneshot_hooks(cls, strategy) -> list:
        return [MixedQKV.mutate, MixedPrefixLinear.mutate, MixedAbsolutePositionEmbedding.mutate,
                MixedClassToken.mutate]

    @classmethod
    def preset(cls, name: str) -> dict[str, Any]:
        """Constructor keywords of a preset search space: ``tiny``, ``small`` or ``base``."""
        if name not in PRESETS:
            raise SpaceError(f'unknown preset {name!r}: choose one of {", ".join(PRESETS)}')
        return copy.deepcopy(PRESETS[name])

    @classmethod
    def searched_arch(cls, name: str) -> dict[str, Any]:
        """The architecture of AutoFormer-T/S/B (``autoformer-tiny`` or just ``tiny``, ...)."""
        size = name.removeprefix('autoformer-')
        if size not in SEARCHED:
            raise SpaceError(f'unknown searched model {name!r}: choose one of '
                            f'{", ".join("autoformer-" + s for s in SEARCHED)}')
        embed_dim, ratios, heads = SEARCHED[size]
        return make_arch(embed_dim, ratios, heads)

    @classmethod
    def load_searched_model(cls, name: str, weights: str | Path | None = None) -> nn.Module:
        """AutoFormer-T/S/B as a plain module. ``weights``: None (random init), a file, or ``'nni'`` (download).

        A file may hold subnet weights (this project's or NNI hub's) or a whole supernet in any
        supported layout, which is then sliced to the searched architecture.
        """
        size = name.removeprefix('autoformer-')
        cls.searched_arch(name)  # refuses an unknown name
        return _checkpoints().load_model(weights, size)[0]

    @classmethod
    def load_supernet_weights(cls, name: str | Mapping[str, Any] | None, path: str | Path,
                              layout: str | None = None) -> dict[str, torch.Tensor]:
        """Supernet weights in this project's layout, fitted to the space ``name``.

        ``name``: a preset, constructor kwargs, or None for the space stored in the file.
        ``path`` may hold this project's layout, an official AutoFormer checkpoint or NNI hub's
        supernet; ``'nni'`` downloads NNI's. ``layout`` (official, nni, project) is detected from
        the keys when not given.
        """
        return _checkpoints().load_supernet_file(path, name, layout)[0]

    @classmethod
    def load_strategy_checkpoint(cls, name: str, weights: str | Path | None = None) -> 'SupernetCheckpoint':
        """The seed's ``load_strategy_checkpoint('random-one-shot-tiny', weights=path)``: a trained
        ``RandomOneShot`` supernet (the space stored with the weights, checked against the preset)."""
        size = name.removeprefix('random-one-shot-')
        if weights is None:
            return SupernetCheckpoint(build_supernet(cls.preset(size)))
        state_dict, space_kwargs, _ = _checkpoints().load_supernet_file(weights, size)
        supernet = build_supernet(space_kwargs)
        supernet.load_state_dict(state_dict)
        return SupernetCheckpoint(supernet)

    def count_params(self, arch: Mapping[str, Any]) -> int:
        return count_params(arch, **self.space_kwargs)

    def count_flops(self, arch: Mapping[str, Any]) -> int:
        return count_flops(arch, **self.space_kwargs)

    def freeze(self, sample: Mapping[str, Any]) -> nn.Module:
        """A plain module for one architecture (refuses archs outside the space with a clear message).

        A one-shot supernet freezes through NNI (its mixed operations copy their weight slices);
        the plain space builds the subnet directly in NNI's fixed-arch context, without NNI's
        generic freeze, which deep-copies every non-mutable module.
        """
        arch = complete_arch(sample, self.space_kwargs)
        if any(isinstance(module, BaseSuperNetModule) for module in self.modules()):
            return super().freeze(arch)
        with model_context(arch):
            return AutoformerSpace(**self.space_kwargs)


def _checkpoints():
    """checkpoints.py, which reads weights files; a lone copy of space.py says which file it lacks."""
    try:
        import checkpoints
    except ModuleNotFoundError as err:
        if err.name not in ('checkpoints', 'utils'):
            raise
        raise SpaceError('loading weights needs checkpoints.py (and utils.py) beside space.py, from the '
                         'AutoFormer-on-NNI repository; space.py alone builds, freezes and slices') from None
    return checkpoints


class SupernetCheckpoint:
    """A trained supernet with ``.model`` and ``.sub_state_dict(arch)``, as NNI's hub's strategy checkpoints."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def sub_state_dict(self, arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return sub_state_dict(self.model.state_dict(), arch)


def build_supernet(space_kwargs: Mapping[str, Any]) -> AutoformerSpace:
    """The weight-entangled supernet: the space mutated by NNI's ``RandomOneShot``, initialised as the official one."""
    from nni.nas.strategy import RandomOneShot
    supernet = RandomOneShot().mutate_model(AutoformerSpace(**space_kwargs))
    init_weights(supernet)  # the mutation makes its mixed layers anew, with PyTorch's default init
    return supernet


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """The official supernet's initialisation (``_init_weights``): every linear layer's weight from a
    truncated normal of std 0.02 and a zero bias, LayerNorms 1 / 0. The class token, the position
    embedding and the relative-position tables are drawn with std 0.02 where they are made; the patch
    embedding keeps PyTorch's default, as in the official code. :func:`build_supernet` applies it; a
    subnet retrained from scratch gets it from the training driver (a frozen subnet usually receives
    weights, so building one does not pay for it)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def set_active_arch(supernet: AutoformerSpace, arch: Mapping[str, Any]) -> None:
    """Make a one-shot supernet run ``arch`` from now on (NNI's resample, with every label given)."""
    memo = complete_arch(arch, supernet.space_kwargs)
    for module in supernet.modules():
        if isinstance(module, BaseSuperNetModule):
            module.resample(memo=memo)


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

def complete_space_kwargs(**kwargs: Any) -> dict[str, Any]:
    """All constructor keywords with defaults filled in (``rpe_length`` resolved)."""
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f'unknown AutoformerSpace arguments: {sorted(unknown)}')
    space_kwargs = {**DEFAULTS, **kwargs}
    problem = space_problem(space_kwargs)
    if problem:
        raise SpaceError(f'invalid space: {problem}')
    if space_kwargs['rpe_length'] is None:
        space_kwargs['rpe_length'] = space_kwargs['img_size'] // space_kwargs['patch_size']
    return space_kwargs


def _is_int(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def space_problem(space_kwargs: Mapping[str, Any]) -> str | None:
    """What makes a space's keywords unusable (one phrase), or None: the checks a stored ``space``
    of a weights file must pass before anything is built from it."""
    for key in ('search_embed_dim', 'search_num_heads', 'search_depth', 'search_mlp_ratio'):
        values = space_kwargs[key]
        ratios = key == 'search_mlp_ratio'
        ok = (lambda v: is_number(v) and v > 0) if ratios else _is_int
        if not isinstance(values, (list, tuple)) or not values or not all(ok(v) for v in values):
            kind = 'positive numbers' if ratios else 'positive integers'
            return f'{key} must be a non-empty list of {kind}, got {values!r}'
    for key in ('img_size', 'patch_size', 'in_channels'):
        if not _is_int(space_kwargs[key]):
            return f'{key} must be a positive integer, got {space_kwargs[key]!r}'
    if space_kwargs['img_size'] < space_kwargs['patch_size']:
        return f'img_size {space_kwargs["img_size"]} is smaller than patch_size {space_kwargs["patch_size"]}'
    if space_kwargs['img_size'] % space_kwargs['patch_size']:  # the patch conv would drop the border silently
        return f'img_size {space_kwargs["img_size"]} is not a multiple of patch_size {space_kwargs["patch_size"]}'
    if not _is_int(space_kwargs['num_labels'], 0):
        return f'num_labels must be an integer of 0 or more, got {space_kwargs["num_labels"]!r}'
    for key in ('qkv_bias', 'pre_norm', 'global_pooling', 'absolute_position', 'rpe'):
        if not isinstance(space_kwargs[key], bool):
            return f'{key} must be true or false, got {space_kwargs[key]!r}'
    for key in ('drop_rate', 'attn_drop_rate', 'drop_path_rate'):
        if not (is_number(space_kwargs[key]) and 0 <= space_kwargs[key] < 1):
            return f'{key} must be a number in [0, 1), got {space_kwargs[key]!r}'
    scale = space_kwargs['qk_scale']
    if scale is not None and not (is_number(scale) and scale > 0):
        return f'qk_scale must be a positive number or null, got {space_kwargs["qk_scale"]!r}'
    if space_kwargs['rpe_length'] is not None and not _is_int(space_kwargs['rpe_length']):
        return f'rpe_length must be a positive integer or null, got {space_kwargs["rpe_length"]!r}'
    return None


def make_arch(embed_dim: int, mlp_ratios: list[float], num_heads: list[int]) -> dict[str, Any]:
    """An arch dict from per-layer lists (their common length is the depth)."""
    arch: dict[str, Any] = {'embed_dim': embed_dim, 'depth': len(mlp_ratios)}
    for i, (ratio, heads) in enumerate(zip(mlp_ratios, num_heads, strict=True)):
        arch[f'mlp_ratio_{i}'] = ratio
        arch[f'num_head_{i}'] = heads
    return arch


def arch_choices(space_kwargs: Mapping[str, Any]) -> dict[str, list]:
    """Every label of the space with its allowed values."""
    choices: dict[str, list] = {'embed_dim': list(space_kwargs['search_embed_dim']),
                                'depth': list(space_kwargs['search_depth'])}
    for i in range(max(space_kwargs['search_depth'])):
        choices[f'mlp_ratio_{i}'] = list(space_kwargs['search_mlp_ratio'])
        choices[f'num_head_{i}'] = list(space_kwargs['search_num_heads'])
    return choices


def sample_arch(space_kwargs: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """One architecture drawn uniformly, label by label."""
    return {label: rng.choice(values) for label, values in arch_choices(space_kwargs).items()}


def extreme_arch(space_kwargs: Mapping[str, Any], pick: Callable = min) -> dict[str, Any]:
    """The smallest (``pick=min``) or largest (``pick=max``) subnet of a space."""
    return {label: pick(values) for label, values in arch_choices(space_kwargs).items()}


def typed_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Every label's value as its type: a float for MLP ratios, else an int (NNI's JSON round trips turn a
    ratio of 3.0 into 3)."""
    return {label: float(value) if str(label).startswith('mlp_ratio') else int(value) for label, value in arch.items()}


def canonical_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The labels an arch really uses (unused layers dropped), typed: two archs that run the same subnet
    compare equal in this form."""
    depth = int(arch['depth'])
    used = ['embed_dim', 'depth'] + [f'{kind}_{i}' for i in range(depth) for kind in ('mlp_ratio', 'num_head')]
    return typed_arch({label: arch[label] for label in used})


def arch_key(arch: Mapping[str, Any]) -> str:
    """A stable name of an arch (labels of unused layers ignored)."""
    return hashlib.sha1(json.dumps(canonical_arch(arch), sort_keys=True).encode()).hexdigest()[:16]


def check_arch(arch: Mapping[str, Any], space_kwargs: Mapping[str, Any]) -> None:
    """Refuse a missing label or a value outside the space, naming the label and the allowed values."""
    if not isinstance(arch, Mapping):
        raise SpaceError(f'an arch must be a JSON object / dict of labels, got {type(arch).__name__}')
    choices = arch_choices(space_kwargs)
    unknown = sorted(str(label) for label in arch if label not in choices and not _LAYER_LABEL.fullmatch(str(label)))
    if unknown:  # a typo such as 'embed_dims' would otherwise be ignored silently
        last = max(space_kwargs['search_depth']) - 1
        raise SpaceError(f'arch label {unknown[0]!r} is not a label of the space (its labels: embed_dim, depth, '
                        f'mlp_ratio_0..{last}, num_head_0..{last})')
    for label in ('embed_dim', 'depth'):
        _check_label(arch, label, choices[label])
    for i in range(arch['depth']):
        for label in (f'mlp_ratio_{i}', f'num_head_{i}'):
            _check_label(arch, label, choices[label])


# Labels of layers past the space's depth are ignored like those past the arch's depth.
_LAYER_LABEL = re.compile(r'(mlp_ratio|num_head)_\d+')


def _check_label(arch: Mapping[str, Any], label: str, allowed: list) -> None:
    if label not in arch:
        raise SpaceError(f'arch is missing the label {label!r} (allowed values: {allowed})')
    value = arch[label]
    if label.startswith('mlp_ratio') and not is_number(value) or not label.startswith('mlp_ratio') and not \
            _is_int(value, least=-2**63):
        kind = 'a number' if label.startswith('mlp_ratio') else 'an integer'
        raise SpaceError(f'arch value {label}={value!r} must be {kind} (allowed values: {allowed})')
    if value not in allowed:
        raise SpaceError(f'arch value {label}={value!r} is outside the space (allowed values: {allowed})')


# Names an arch may be given by: the space's smallest and largest subnet.
EXTREMES: dict[str, Callable] = {'smallest': min, 'largest': max}


def complete_arch(arch: Mapping[str, Any] | str, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arch`` and fill the labels of unused layers, which NNI still wants to see; ``smallest`` or
    ``largest`` names the space's extreme subnet."""
    if isinstance(arch, str) and arch in EXTREMES:
        return extreme_arch(space_kwargs, EXTREMES[arch])
    check_arch(arch, space_kwargs)
    full = {label: values[0] for label, values in arch_choices(space_kwargs).items()}
    full.update({label: arch[label] for label in full if label in arch})
    return full


def layer_dims(arch: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """(embed dim, q dim, mlp hidden dim) of each used layer, with the official int() rounding."""
    embed = int(arch['embed_dim'])
    return [(embed, int(arch[f'num_head_{i}']) * HEAD_DIM, int(embed * arch[f'mlp_ratio_{i}']))
            for i in range(int(arch['depth']))]


def count_params(arch: Mapping[str, Any], **space_kwargs: Any) -> int:
    """Parameters of a subnet by the official rule (``get_sampled_params_numel``); exact."""
    space_kwargs = complete_space_kwargs(**space_kwargs)
    check_arch(arch, space_kwargs)
    embed = arch['embed_dim']
    table_rows = 2 * space_kwargs['rpe_length'] + 2
    total = embed * space_kwargs['in_channels'] * space_kwargs['patch_size'] ** 2 + embed       # patch embed
    positions = _num_patches(space_kwargs) + 1 if space_kwargs['absolute_position'] else 0
    total += embed * (positions + 1)                                                   # class token, pos embed
    for e, q, hidden in layer_dims(arch):
        total += 3 * q * e + (3 * q if space_kwargs['qkv_bias'] else 0)                     # qkv
        total += q * e + e                                                           # proj
        total += 4 * table_rows * HEAD_DIM if space_kwargs['rpe'] else 0                   # 2 x 2 tables
        total += 4 * e                                                               # two layer norms
        total += 2 * e * hidden + hidden + e                                         # fc1, fc2
    total += 2 * embed if space_kwargs['pre_norm'] else 0
    total += embed * space_kwargs['num_labels'] + space_kwargs['num_labels']
    return total


def _num_patches(space_kwargs: Mapping[str, Any]) -> int:
    return (space_kwargs['img_size'] // space_kwargs['patch_size']) ** 2


def count_flops(arch: Mapping[str, Any], **space_kwargs: Any) -> int:
    """Multiply-accumulates per image of ``space.freeze(arch)``: matmuls and the patch conv, as
    ``torch.utils.flop_counter`` counts them, halved, except the 0/1 bucket-membership columns
    that :class:`RelativePosition2D` carries through the attention matmuls (bookkeeping, not
    arithmetic of the model: the encoding counts as 4 N q (2L + 2) per layer)."""
    space_kwargs = complete_space_kwargs(**space_kwargs)
    check_arch(arch, space_kwargs)
    embed = arch['embed_dim']
    patches = _num_patches(space_kwargs)
    tokens = patches + 1
    table_rows = 2 * space_kwargs['rpe_length'] + 2
    total = patches * embed * space_kwargs['in_channels'] * space_kwargs['patch_size'] ** 2
    for e, q, hidden in layer_dims(arch):
        total += tokens * e * 3 * q + 2 * tokens * tokens * q + tokens * q * e     # qkv, qk^T, attn v, proj
        if space_kwargs['rpe']:
            total += 4 * tokens * q * table_rows                                   # rpe on keys and values
        total += 2 * tokens * e * hidden                                           # fc1, fc2
    return total + embed * space_kwargs['num_labels']


# --------------------------------------------------------------------------------------------
# Weights: slicing, layouts, loading
# --------------------------------------------------------------------------------------------

def sub_state_dict(supernet_state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The exact weights of ``space.freeze(arch)`` sliced from a supernet state dict (this project's layout)."""
    _check_arch_fits(supernet_state_dict, arch)
    dims = layer_dims(arch)
    embed = arch['embed_dim']
    result = {}
    for key, tensor in supernet_state_dict.items():
        if key.startswith('blocks.blocks.'):
            index, rest = key[len('blocks.blocks.'):].split('.', 1)
            if int(index) >= len(dims):
                continue
            result[f'blocks.{index}.{rest}'] = _slice_block_tensor(rest, tensor, *dims[int(index)])
        elif key in ('cls_token.cls_token', 'pos_embed.pos_embed'):
            result[key] = tensor[..., :embed]
        elif key == 'head.weight':
            result[key] = tensor[:, :embed]
        elif key == 'head.bias':
            result[key] = tensor
        else:  # patch_embed.*, norm.*
            result[key] = tensor[:embed]
    return {k: v.clone() for k, v in result.items()}


def inherited_subnet(supernet_state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any],
                     space_kwargs: Mapping[str, Any]) -> nn.Module:
    """``AutoformerSpace(**space_kwargs).freeze(arch)`` holding the weights it inherits from the supernet."""
    model = AutoformerSpace(**space_kwargs).freeze(arch)
    model.load_state_dict(sub_state_dict(supernet_state_dict, arch))
    return model


def _slice_block_tensor(name: str, tensor: torch.Tensor, embed: int, q_dim: int, hidden: int) -> torch.Tensor:
    if name == 'attn.qkv.weight':
        return official_qkv_slice(tensor, None, embed, 3 * q_dim)[0]
    if name == 'attn.qkv.bias':
        return tensor[:3 * q_dim]
    if name == 'attn.proj.weight':
        return tensor[:embed, :q_dim]
    if name.startswith('attn.rel_pos_embed'):
        return tensor
    if name == 'fc1.weight':
        return tensor[:hidden, :embed]
    if name == 'fc1.bias':
        return tensor[:hidden]
    if name == 'fc2.weight':
        return tensor[:embed, :hidden]
    return tensor[:embed]  # proj.bias, fc2.bias, layer norms


def _check_arch_fits(state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> None:
    for label in ('embed_dim', 'depth'):
        if label not in arch:
            raise SpaceError(f'arch is missing the label {label!r}')
        if not _is_int(arch[label]):
            raise SpaceError(f'arch value {label}={arch[label]!r} must be a positive integer')
    width = state_dict['patch_embed.weight'].shape[0]
    depth = len({k.split('.')[2] for k in state_dict if k.startswith('blocks.blocks.')})
    if not 0 < arch['embed_dim'] <= width:
        raise SpaceError(f'arch value embed_dim={arch["embed_dim"]} does not fit a supernet {width} wide')
    if not 0 < arch['depth'] <= depth:
        raise SpaceError(f'arch value depth={arch["depth"]} does not fit a supernet of depth {depth}')
    for i in range(arch['depth']):
        prefix = f'blocks.blocks.{i}.'
        for label, needed, rows in ((f'num_head_{i}', 3 * HEAD_DIM, state_dict[prefix + 'attn.qkv.weight'].shape[0]),
                                    (f'mlp_ratio_{i}', arch['embed_dim'], state_dict[prefix + 'fc1.weight'].shape[0])):
            if label not in arch:
                raise SpaceError(f'arch is missing the label {label!r}')
            if not is_number(arch[label]) or not 0 < needed * arch[label] <= rows:
                raise SpaceError(f'arch value {label}={arch[label]!r} does not fit the supernet')


def preset_name(space_kwargs: Mapping[str, Any]) -> str | None:
    """The preset whose search space ``space_kwargs`` has, if any."""
    return next((name for name, preset in PRESETS.items()
                 if all(list(preset[k]) == list(space_kwargs[k]) for k in SEARCH_KEYS)), None)

# --------------------------------------------------------------------------------------------
# Fast paths: each equals the plain formula its docstring gives (bench/reference.py holds them
# written out; tests/test_fast_paths.py compares them), and only saves memory traffic in training.
# --------------------------------------------------------------------------------------------

class SlicedLinear(torch.autograd.Function):
    """``F.linear`` with some rows and the first ``in_features`` columns of a larger weight: it equals
    ``F.linear(inputs, weight[rows, :in_features], bias[:len(rows)])`` (``weight[:rows, :in_features]`` and
    ``bias[:rows]`` when ``rows`` is a count), values and gradients.

    ``rows``: the number of leading rows, or a tensor of row indices. The weight gradient is
    written straight into one full-size tensor; slicing in autograd makes the block's gradient,
    then a zero tensor per slice to copy it into, and for qkv's interleaved rows three of them
    summed. The gain is memory traffic; ``bench/kernels.py`` times both ways.
    """

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                rows: int | torch.Tensor, in_features: int) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight, bias)
        ctx.rows, ctx.in_features = rows, in_features
        out_features = len(rows) if isinstance(rows, torch.Tensor) else rows
        return F.linear(inputs, _sliced_weight(weight, rows, in_features),
                        None if bias is None else bias[:out_features])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs, weight, bias = ctx.saved_tensors
        rows, in_features = ctx.rows, ctx.in_features
        grad = grad.reshape(-1, grad.shape[-1])
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            block = _sliced_weight(weight, rows, in_features).to(grad.dtype)
            grad_inputs = (grad @ block).view(*inputs.shape[:-1], in_features)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            columns = grad_weight[:, :in_features]
            inputs_2d = inputs.reshape(-1, in_features).to(grad.dtype)
            if isinstance(rows, torch.Tensor):
                columns.index_copy_(0, rows, (grad.t() @ inputs_2d).to(weight.dtype))
            elif grad.dtype == weight.dtype:
                columns[:rows].addmm_(grad.t(), inputs_2d)
            else:  # autocast: the product in the forward's dtype, kept in the weight's
                columns[:rows].copy_(grad.t() @ inputs_2d)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros_like(bias)
            grad_bias[:grad.shape[1]] = grad.sum(0)
        return grad_inputs, grad_weight, grad_bias, None, None


def _sliced_weight(weight: torch.Tensor, rows: int | torch.Tensor, in_features: int) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return weight[:, :in_features].index_select(0, rows)
    return weight[:rows, :in_features]


@lru_cache(maxsize=64)
def qkv_rows(out_features: int, device: torch.device) -> torch.Tensor:
    """Rows of an official-layout qkv weight in (q; k; v) order (see :func:`official_qkv_slice`)."""
    rows = torch.arange(out_features, device=device)
    return torch.cat([rows[0::3], rows[1::3], rows[2::3]])


def with_bucket_columns(right: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``[right, members]`` along the last dim, ``members`` (N, buckets) broadcast over batch and heads."""
    return torch.cat([right, members.to(right.dtype).expand(*right.shape[:-1], members.shape[-1])], dim=-1)


class MatmulWithBucketColumns(torch.autograd.Function):
    """``left @ [right, members]`` or, with ``transpose``, ``left @ [right, members]^T``: it equals
    ``left @ with_bucket_columns(right, members)`` (transposed), values and gradients.

    The 0/1 bucket ``members`` of :class:`RelativePosition2D` need no gradient, so the gradient
    of ``right`` is computed for its own columns only (a third of that matmul saved).
    """

    @staticmethod
    def forward(ctx, left: torch.Tensor, right: torch.Tensor, members: torch.Tensor,
                transpose: bool) -> torch.Tensor:
        full = with_bucket_columns(right, members)
        ctx.save_for_backward(left, full)
        ctx.transpose, ctx.width = transpose, right.shape[-1]
        return left @ (full.transpose(-2, -1) if transpose else full)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, full = (t.to(grad.dtype) for t in ctx.saved_tensors)  # autocast: the forward's dtype
        if ctx.transpose:
            return grad @ full, grad.transpose(-2, -1) @ left[..., :ctx.width], None, None
        return grad @ full.transpose(-2, -1), left.transpose(-2, -1) @ grad[..., :ctx.width], None, None


def matmul_with_bucket_columns(left: torch.Tensor, right: torch.Tensor, members: torch.Tensor,
                        transpose: bool) -> torch.Tensor:
    """:class:`MatmulWithBucketColumns` when training; plain ops otherwise (TorchScript and ONNX export them)."""
    if (left.requires_grad or right.requires_grad) and not torch.jit.is_tracing():
        return MatmulWithBucketColumns.apply(left, right, members, transpose)
    full = with_bucket_columns(right, members)
    return left @ (full.transpose(-2, -1) if transpose else full)
