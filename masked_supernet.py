"""The supernet with the arch as data: one graph, at the largest sizes, serves every arch of the space.

The sliced supernet (``space.build_supernet`` + ``space.set_active_arch``) runs each arch with its own tensor
shapes, so every training step has other kernel sizes and neither ``torch.compile`` nor CUDA graphs can keep one
program. :class:`MaskedSupernet` runs the same weights at the space's largest sizes and turns the arch into
tensors that it multiplies in:

* embedding width ``e``: a 0/1 mask on every tensor of the residual stream, and LayerNorms whose mean and
  variance are taken over the first ``e`` features (the rest is zero, and stays zero);
* heads of a layer: all heads are computed, the outputs of heads past the layer's count are zeroed before the
  projection; the official qkv bias (the contiguous prefix ``bias[:3 q]``, split in three) is gathered by index;
* MLP width: a 0/1 mask on the hidden features;
* depth: a layer past the arch's depth passes its input through (``torch.where`` on a 0-d bool tensor).

Features, heads and layers that the arch does not use contribute exact zeros, so the logits equal the sliced
path's up to the order of float sums, and every weight the arch does not use gets a zero gradient (where the
sliced path leaves a layer past the depth with none). ``tests/test_masked_supernet.py`` holds both against the
sliced path in float64, and asserts that dynamo compiles one graph for archs of every depth, width and head count.

The price is arithmetic: every step costs what the largest arch costs. On a GPU that waits for Python and kernel
launches (a tiny-space step is a few ms of matrix work), one compiled graph, or one captured CUDA graph, is worth
more than the skipped work; on a CPU, which is bound by arithmetic, the sliced path stays faster.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from arch import HEAD_DIM, SpaceError, complete_arch, layer_dims
from layers import SDPA_DEVICES
from space import AutoformerSpace


class MaskedSupernet(nn.Module):
    """``supernet`` (``space.build_supernet``'s, its parameters shared, not copied) with the arch as data.

    ``set_arch(arch)`` writes the arch into this module's buffers in place (their storage never moves, so a
    compiled graph or a captured CUDA graph reads the new arch); ``forward(images)`` runs it. Compile it once
    (``torch.compile(masked)``); every later arch runs the same graph.
    """

    def __init__(self, supernet: AutoformerSpace) -> None:
        super().__init__()
        self.space_kwargs = dict(supernet.space_kwargs)
        if self.space_kwargs['num_labels'] == 0:
            raise SpaceError('MaskedSupernet needs a classifier head (num_labels > 0): features-only spaces put out '
                             "each arch's own width, which only the sliced supernet does")
        self.supernet = supernet
        blocks = supernet.blocks.blocks
        self.embed_dim = supernet.patch_embed.weight.shape[0]
        self.max_heads = blocks[0].attn.qkv.weight.shape[0] // (3 * HEAD_DIM)
        self.hidden_dim = blocks[0].fc1.weight.shape[0]
        depth = len(blocks)
        device = supernet.patch_embed.weight.device  # with the weights: a CUDA supernet gets CUDA buffers
        for name, shape, dtype in (('embed_mask', (self.embed_dim,), torch.float32),
                                   ('embed_count', (), torch.float32),
                                   ('head_mask', (depth, self.max_heads), torch.float32),
                                   ('hidden_mask', (depth, self.hidden_dim), torch.float32),
                                   ('layer_active', (depth,), torch.bool),
                                   ('qkv_bias_index', (depth, 3, self.max_heads * HEAD_DIM), torch.long)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.set_arch('largest')

    @torch.no_grad()
    def set_arch(self, arch: Mapping[str, Any] | str) -> None:
        """Run ``arch`` from now on (``smallest`` / ``largest`` name the extremes); refused if outside the space."""
        arch = complete_arch(arch, self.space_kwargs)
        dims = layer_dims(arch)
        embed = dims[0][0]
        heads = torch.zeros(self.head_mask.shape)
        hidden = torch.zeros(self.hidden_mask.shape)
        feature = torch.arange(self.max_heads * HEAD_DIM)
        bias_index = feature.expand(*self.qkv_bias_index.shape).clone()
        for i, (_, q_dim, hidden_dim) in enumerate(dims):
            heads[i, :q_dim // HEAD_DIM] = 1
            hidden[i, :hidden_dim] = 1
            # q, k, v of feature j read bias[j], bias[q + j], bias[2q + j]; features past q are zeroed anyway
            bias_index[i] = (torch.arange(3)[:, None] * q_dim + feature).clamp(max=3 * self.max_heads * HEAD_DIM - 1)
        updates = {'embed_mask': (torch.arange(self.embed_dim) < embed).float(),
                   'embed_count': torch.tensor(float(embed)), 'head_mask': heads, 'hidden_mask': hidden,
                   'layer_active': torch.arange(len(self.layer_active)) < len(dims), 'qkv_bias_index': bias_index}
        for name, value in updates.items():
            getattr(self, name).copy_(value, non_blocking=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.supernet
        embed_mask = self.embed_mask
        x = F.conv2d(net.stem(images), net.patch_embed.weight, net.patch_embed.bias, stride=net.patch_embed.stride)
        x = x.flatten(2).transpose(1, 2) * embed_mask.to(x.dtype)
        cls_token = net.cls_token.cls_token * embed_mask
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # promoted as the sliced path's
        if not isinstance(net.pos_embed, nn.Identity):
            x = x + net.pos_embed.pos_embed * embed_mask
        x = net.pos_drop(x)
        for i, block in enumerate(net.blocks.blocks):
            x = self._block(i, block, x)
        if self.space_kwargs['pre_norm']:
            x = self._layer_norm(net.norm, x)
        x = x[:, 1:].mean(dim=1) if self.space_kwargs['global_pooling'] else x[:, 0]
        return F.linear(x, net.head.weight, net.head.bias)

    def _block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        active = self.layer_active[i]
        attention = self._residual(block, block.attn_layer_norm, x, lambda h: self._attention(i, block, h))
        x = torch.where(active, attention, x)
        mlp = self._residual(block, block.ffn_layer_norm, x, lambda h: self._mlp(i, block, h))
        return torch.where(active, mlp, x)

    def _residual(self, block: nn.Module, norm: nn.Module, x: torch.Tensor, branch) -> torch.Tensor:
        if block.pre_norm:
            return x + block.drop_path(branch(self._layer_norm(norm, x)))
        return self._layer_norm(norm, x + block.drop_path(branch(x)))

    def _layer_norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the first ``e`` features (the rest of ``x`` is zero), in float32 at least, as autocast
        runs ``F.layer_norm``; the features past ``e`` come out zero."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        mask = self.embed_mask.to(x.dtype)
        count = self.embed_count.to(x.dtype)
        centered = (x - x.sum(-1, keepdim=True) / count) * mask
        variance = centered.square().sum(-1, keepdim=True) / count
        return centered * torch.rsqrt(variance + norm.eps) * norm.weight + norm.bias * mask

    def _attention(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        batch, tokens, _ = x.shape
        qkv = F.linear(x, attn.qkv.weight).view(batch, tokens, self.max_heads * HEAD_DIM, 3)  # rows q, k, v, q, ...
        if attn.qkv.bias is not None:
            qkv = qkv + attn.qkv.bias[self.qkv_bias_index[i]].t().to(qkv.dtype)
        q, k, v = qkv.view(batch, tokens, self.max_heads, HEAD_DIM, 3).permute(4, 0, 2, 1, 3)
        fused = x.device.type in SDPA_DEVICES and not torch.jit.is_tracing()
        out = attn.fused(q, k, v) if fused else attn.explicit(q, k, v)
        out = out * self.head_mask[i].view(1, -1, 1, 1).to(out.dtype)
        out = F.linear(out.transpose(1, 2).reshape(batch, tokens, -1), attn.proj.weight, attn.proj.bias)
        return attn.proj_drop(out * self.embed_mask.to(out.dtype))

    def _mlp(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hidden = block.act(F.linear(x, block.fc1.weight, block.fc1.bias))
        hidden = block.dropout(hidden * self.hidden_mask[i].to(hidden.dtype))
        out = F.linear(hidden, block.fc2.weight, block.fc2.bias)
        return block.dropout(out * self.embed_mask.to(out.dtype))
