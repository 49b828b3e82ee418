"""The layers of the AutoFormer space (NNI 3.0 mutables) and the fast ops under them; imports only the head size
(``arch.HEAD_DIM``) from this project.

In the supernet, ``MixedQKV`` slices the largest qkv in the official layout, which NNI's mixed operations cannot.
The fast ops each equal the plain formula their docstring gives (``bench/reference.py`` writes them out,
``tests/test_fast_paths.py`` compares them) and only save memory traffic in training.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

with warnings.catch_warnings():  # NNI 3.0 predates torch 2.14: one harmless warning per torch class it does not know
    warnings.filterwarnings('ignore', message=r'.*is found to be not a nn\.Module', category=RuntimeWarning)
    from nni.mutable import MutableExpression
    from nni.nas.nn.pytorch import MutableLayerNorm, MutableLinear, ParametrizedModule
    from nni.nas.oneshot.pytorch.supermodule.operation import MixedLinear, MixedOperation

from arch import HEAD_DIM

# Device types whose attention runs through F.scaled_dot_product_attention (Attention.fused): on CUDA its
# flash / memory-efficient kernels keep no N x N tensor. Elsewhere the explicit matmuls, which are faster
# on the CPU (bench/train_step.py --attention compares the two).
SDPA_DEVICES = {'cuda'}


def build_conv_stem(in_channels: int, channels: int) -> nn.Sequential:
    """Two 3x3 stride-2 convolutions, each with BatchNorm and ReLU (Xiao et al., "Early convolutions help
    transformers see better", 2021), before the patch embedding: trained from scratch on a few thousand
    images, a linear patch embedding misses a defect a few pixels wide that these see
    (bench/results/thin-details.md). The same for every subnet, so its BatchNorm statistics fit them all."""
    half = channels // 2
    return nn.Sequential(nn.Conv2d(in_channels, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                         nn.Conv2d(half, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


def official_qkv_slice(weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                       out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The subnet's (q; k; v) weight and bias from an official-layout supernet qkv.

    Weight rows are interleaved (q, k, v, q, k, v, ...) over the first ``out_features`` rows;
    the bias is the contiguous prefix ``bias[:out_features]``, split in three by the caller.
    """
    rows = weight[:out_features, :in_features]
    weight = torch.cat([rows[0::3], rows[1::3], rows[2::3]])
    return weight, None if bias is None else bias[:out_features]


@lru_cache(maxsize=64)
def qkv_rows(out_features: int, device: torch.device) -> torch.Tensor:
    """Rows of an official-layout qkv weight in (q; k; v) order (see :func:`official_qkv_slice`)."""
    rows = torch.arange(out_features, device=device)
    return torch.cat([rows[0::3], rows[1::3], rows[2::3]])


def _sliced_weight(weight: torch.Tensor, rows: int | torch.Tensor, in_features: int) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return weight[:, :in_features].index_select(0, rows)
    return weight[:rows, :in_features]


class SlicedLinear(torch.autograd.Function):
    """``F.linear`` with some rows and the first ``in_features`` columns of a larger weight: it equals
    ``F.linear(inputs, weight[rows, :in_features], bias[:len(rows)])`` (``weight[:rows, :in_features]`` and
    ``bias[:rows]`` when ``rows`` is a count), values and gradients.

    ``rows``: the number of leading rows, or a tensor of row indices. The weight gradient is written straight into one
    full-size tensor; slicing in autograd makes the block's gradient, then a zero tensor per slice to copy it into, and
    for qkv's interleaved rows three of them summed. The gain is memory traffic; ``bench/kernels.py`` times both ways.
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
    def forward(ctx, left: torch.Tensor, right: torch.Tensor, members: torch.Tensor, transpose: bool) -> torch.Tensor:
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


class MutableQKV(ParametrizedModule, nn.Linear, wraps=nn.Linear):
    """The q, k, v projection. Frozen, it is a plain ``nn.Linear`` whose output rows are q; k; v. In the supernet
    (:class:`MixedQKV`) its weight rows are interleaved and its bias is not, exactly as the official ``qkv_super``."""


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

    Plainly: ``r(i, j) = table_v[dv(i, j)] + table_h[dh(i, j)]``, with dv, dh the clipped row and column distances (row
    0 of each table for pairs with the class token), added to the keys' logits as ``q_i . r(i, j)`` and to the values as
    ``sum_j attn_ij r(i, j)``. Every key of one grid row shares dv and of one grid column dh, so the encoding of key j
    is picked by a fixed 0/1 vector ``e_j`` (its class / row / column bucket) and each query's table row per bucket:

    * keys: ``q . r(i, j) = a_i . e_j`` where ``a_i`` gathers ``q_i . table`` per bucket, so the
      logits are one matmul ``[q, a] @ [k, e]^T``;
    * values: ``attn @ [v, e]`` gives, next to ``attn @ v``, the attention summed per bucket,
      which is scattered to table rows and multiplied by the small tables.

    Outputs equal the direct formulation (``bench/reference.py``) up to float rounding.
    """

    def __init__(self, head_dim: int, length: int) -> None:
        super().__init__()
        self.length = length
        self.embeddings_table_v = nn.Parameter(nn.init.trunc_normal_(torch.empty(2 * length + 2, head_dim), std=.02))
        self.embeddings_table_h = nn.Parameter(nn.init.trunc_normal_(torch.empty(2 * length + 2, head_dim), std=.02))
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
        attend = self.fused if x.device.type in SDPA_DEVICES and not torch.jit.is_tracing() else self.explicit
        out = attend(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
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
        attn = self.rel_pos_embed_k.logits(q, k, self.scale) if self.rpe else (q * self.scale) @ k.transpose(-2, -1)
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
