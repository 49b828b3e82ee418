"""The official formulation of the supernet's hot paths, as a reference for tests and benchmarks.

The official ``AttentionSuper`` scales ``q @ k^T`` and, through ``RelativePosition2D_super``,
gathers an (N, N, head_dim) table per layer for keys and another for values on every forward and
multiplies through them; ``direct_rpe()`` swaps that into :class:`layers.RelativePosition2D`. The
official ``LinearSuper`` / ``qkv_super`` slice their weights with autograd (as NNI's
``MixedLinear`` does); ``official_formulation()`` swaps in both, so the two can be timed side by side.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

# layers first: it silences NNI's harmless torch-version warnings before nni is imported.
import layers
from layers import MixedPrefixLinear, MixedQKV, RelativePosition2D, official_qkv_slice
from nni.nas.oneshot.pytorch.supermodule.operation import MixedLinear


def direct_table(module: RelativePosition2D, num_tokens: int) -> torch.Tensor:
    """(N, N, d) encodings, recomputed per call exactly as the official code does."""
    length_q = num_tokens - 1
    side = int(length_q ** 0.5)
    device = module.embeddings_table_v.device
    positions = torch.arange(length_q, device=device)
    distance_v = positions[None, :] // side - positions[:, None] // side
    distance_h = positions[None, :] % side - positions[:, None] % side
    index_v = F.pad(distance_v.clamp(-module.length, module.length) + module.length + 1, (1, 0, 1, 0))
    index_h = F.pad(distance_h.clamp(-module.length, module.length) + module.length + 1, (1, 0, 1, 0))
    return module.embeddings_table_v[index_v] + module.embeddings_table_h[index_h]


def direct_key_bias(module: RelativePosition2D, q: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = q.shape
    table = direct_table(module, tokens)
    bias = q.permute(2, 0, 1, 3).reshape(tokens, heads * batch, dim) @ table.transpose(2, 1)
    return bias.transpose(1, 0).reshape(batch, heads, tokens, tokens)


def direct_value_sum(module: RelativePosition2D, attn: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, _ = attn.shape
    table = direct_table(module, tokens)
    out = attn.permute(2, 0, 1, 3).reshape(tokens, batch * heads, tokens) @ table
    return out.transpose(1, 0).reshape(batch, heads, tokens, -1)


def direct_logits(module: RelativePosition2D, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q @ k.transpose(-2, -1)) * scale + direct_key_bias(module, q) * scale


def direct_attend(module: RelativePosition2D, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attn @ v + direct_value_sum(module, attn)


@contextlib.contextmanager
def direct_rpe() -> Iterator[None]:
    """Run every :class:`RelativePosition2D` with the official (direct) formulation inside the block."""
    saved = RelativePosition2D.logits, RelativePosition2D.attend, set(layers.SDPA_DEVICES)
    RelativePosition2D.logits, RelativePosition2D.attend = direct_logits, direct_attend
    layers.SDPA_DEVICES.clear()  # the explicit attention path, where the direct formulation sits
    try:
        yield
    finally:
        RelativePosition2D.logits, RelativePosition2D.attend, devices = saved
        layers.SDPA_DEVICES.update(devices)


def qkv_sliced_by_autograd(module: MixedQKV, in_features: int, out_features: int,
                           inputs: torch.Tensor) -> torch.Tensor:
    return F.linear(inputs, *official_qkv_slice(module.weight, module.bias, in_features, out_features))


@contextlib.contextmanager
def official_formulation() -> Iterator[None]:
    """The direct relative positions and weights sliced through autograd, inside the block."""
    saved = MixedPrefixLinear.forward_with_args, MixedQKV.forward_with_args
    MixedPrefixLinear.forward_with_args = MixedLinear.forward_with_args
    MixedQKV.forward_with_args = qkv_sliced_by_autograd
    try:
        with direct_rpe():
            yield
    finally:
        MixedPrefixLinear.forward_with_args, MixedQKV.forward_with_args = saved


def in_official_formulation(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run in the official formulation."""
    with official_formulation():
        return function(*args)
