"""The AutoFormer search space (Chen et al., ICCV 2021) as an NNI 3.0 ``ModelSpace``, and its supernet.

One supernet holds every vision transformer of the space; a subnet uses the leading slices of
the largest weights ("weight entanglement"). Four dimensions are searched: ``embed_dim``,
``depth``, and per layer ``mlp_ratio_{i}`` and ``num_head_{i}`` (head dim fixed at 64).

Layouts:

- supernet (this project): the state dict of ``RandomOneShot().mutate_model(AutoformerSpace(...))``.
  ``blocks.blocks.{i}.attn.qkv`` keeps the official AutoFormer layout, which NNI's built-in
  mixed operations cannot slice (see ``layers.MixedQKV``).
- subnet: the state dict of ``space.freeze(arch)``, a plain ViT whose ``qkv`` rows are q; k; v.

This file owns ``AutoformerSpace`` and its public API, the supernet's build, init and active arch, and loading
weights files into models. Layers are ``layers.py``'s; presets, arch rules and counting ``arch.py``'s; weights
files and ``sub_state_dict`` ``checkpoints.py``'s. To use the space elsewhere, copy these files together:
``space.py``, ``layers.py``, ``arch.py``, ``checkpoints.py`` and ``utils.py``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from arch import (DEFAULTS, SEARCHED, STEM_STRIDE, complete_arch, complete_space_kwargs, preset_name, preset_space,
                  searched_arch)
from checkpoints import (convert_nni_subnet, detect_layout, fit_to_space, is_subnet, load_checked, nni_download,
                         read_weights, resolve_space, sub_state_dict, to_project_layout, torch_load)
from layers import Block, MixedPrefixLinear, MixedQKV, build_conv_stem
from utils import UserError

# Imported after layers.py, which imports NNI first with NNI's warnings about this torch version silenced.
import nni
from nni.nas.hub.pytorch.autoformer import (AbsolutePositionEmbedding, ClassToken, MixedAbsolutePositionEmbedding,
                                            MixedClassToken)
from nni.nas.nn.pytorch import ModelSpace, MutableConv2d, MutableLayerNorm, MutableLinear, Repeat
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from nni.nas.space import model_context


def _drop_mixed_op_nested_mutable_warning(record: logging.LogRecord) -> bool:
    """NNI's own mixed class token / position embedding warn about their constructor on every mutation."""
    message = record.getMessage()
    return not ('Found a nested mutable' in message and 'of class Mixed' in message)


logging.getLogger('nni.nas.nn.pytorch.base').addFilter(_drop_mixed_op_nested_mutable_warning)


@dataclass(eq=False)  # compared by identity and hashable, as a plain class
class SupernetCheckpoint:
    """A trained supernet with ``.model`` and ``.sub_state_dict(arch)``, as NNI's hub's strategy checkpoints."""
    model: nn.Module

    def sub_state_dict(self, arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return sub_state_dict(self.model.state_dict(), arch)


@torch.no_grad()
def init_weights(model: nn.Module) -> nn.Module:
    """The official supernet's initialisation (``_init_weights``): every linear layer's weight from a truncated normal
    of std 0.02 and a zero bias, LayerNorms 1 / 0. The class token, the position embedding and the relative-position
    tables are drawn with std 0.02 where they are made; the patch embedding keeps PyTorch's default, as in the official
    code. :func:`build_supernet` applies it; a subnet retrained from scratch gets it from the training driver (a frozen
    subnet usually receives weights, so building one does not pay for it)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


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
    patch_size : the side of the square patches of the input that become tokens.
    conv_stem : channels of a convolutional stem (:func:`layers.build_conv_stem`) before the patch embedding, which
        then embeds its map in patches of ``patch_size / 4``; 0 (the official model): none.
    num_labels : the classes of the head (0: no head, the pooled features come out).
    drop_rate : dropout after the position embedding and in the MLPs.
    drop_path_rate : stochastic depth of the deepest layer (linear from 0 at the first).
    pre_norm : LayerNorm before attention and MLP (and a final LayerNorm), as the official code.
    global_pooling : mean of the patch tokens as the feature, else the class token.
    absolute_position : a learned absolute position embedding besides the relative one.
    qk_scale : the attention scale (default ``head_dim ** -0.5``).
    rpe : 2-D relative position encoding of keys and values (AutoFormer's).
    rpe_length : the clip distance of the relative positions (default ``img_size // patch_size``).
    """

    def __init__(self, search_embed_dim: tuple[int, ...] = (192, 216, 240),
                 search_mlp_ratio: tuple[float, ...] = (3.0, 3.5, 4.0), search_num_heads: tuple[int, ...] = (3, 4),
                 search_depth: tuple[int, ...] = (12, 13, 14), img_size: int = 224, patch_size: int = 16,
                 in_channels: int = 3, num_labels: int = 1000, qkv_bias: bool = True, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, pre_norm: bool = True,
                 global_pooling: bool = True, absolute_position: bool = True, qk_scale: float | None = None,
                 rpe: bool = True, rpe_length: int | None = None, conv_stem: int = 0) -> None:
        super().__init__()
        self.space_kwargs = complete_space_kwargs(**{k: v for k, v in locals().items() if k in DEFAULTS})
        rpe_length = self.space_kwargs['rpe_length']
        max_depth = max(search_depth)
        embed_dim = nni.choice('embed_dim', list(search_embed_dim))
        depth = nni.choice('depth', list(search_depth))
        mlp_ratios = [nni.choice(f'mlp_ratio_{i}', list(search_mlp_ratio)) for i in range(max_depth)]
        num_heads = [nni.choice(f'num_head_{i}', list(search_num_heads)) for i in range(max_depth)]

        self.stem = build_conv_stem(in_channels, conv_stem) if conv_stem else nn.Identity()
        embed_patch = patch_size // STEM_STRIDE if conv_stem else patch_size
        self.patch_embed = MutableConv2d(conv_stem or in_channels, embed_dim, kernel_size=embed_patch,
                                         stride=embed_patch)
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
        self.head = MutableLinear(in_features=embed_dim, out_features=num_labels) if num_labels > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)
        x = self.pos_drop(self.pos_embed(self.cls_token(x)))
        x = self.norm(self.blocks(x))
        x = x[:, 1:].mean(dim=1) if self.global_pooling else x[:, 0]
        return self.head(x)

    @classmethod
    def extra_oneshot_hooks(cls, strategy) -> list:
        return [MixedQKV.mutate, MixedPrefixLinear.mutate, MixedAbsolutePositionEmbedding.mutate,
                MixedClassToken.mutate]

    preset = staticmethod(preset_space)  # the constructor keywords of a preset: tiny, small, base, ...
    searched_arch = staticmethod(searched_arch)  # the arch of AutoFormer-T/S/B: autoformer-tiny (or tiny), ...

    # The load_* classmethods call the loading functions below the class, which build the class.
    @classmethod
    def load_searched_model(cls, name: str, weights: str | Path | None = None) -> nn.Module:
        """AutoFormer-T/S/B as a plain module. ``weights``: None (random init), a file, or ``'nni'`` (download).

        A file may hold subnet weights (this project's or NNI hub's) or a whole supernet in any
        supported layout, which is then sliced to the searched architecture.
        """
        searched_arch(name)  # refuses an unknown name
        return load_model(weights, name.removeprefix('autoformer-'))[0]

    @classmethod
    def load_supernet_weights(cls, name: str | Mapping[str, Any] | None, path: str | Path,
                              layout: str | None = None) -> dict[str, torch.Tensor]:
        """Supernet weights in this project's layout, fitted to the space ``name``.

        ``name``: a preset, constructor kwargs, or None for the space stored in the file. ``path`` may hold this
        project's layout, an official AutoFormer checkpoint or NNI hub's supernet; ``'nni'`` downloads NNI's. ``layout``
        (official, nni, project) is detected from the keys when not given.
        """
        return load_supernet_file(path, name, layout)[0]

    @classmethod
    def load_strategy_checkpoint(cls, name: str, weights: str | Path | None = None) -> SupernetCheckpoint:
        """The seed's ``load_strategy_checkpoint('random-one-shot-tiny', weights=path)``: a trained
        ``RandomOneShot`` supernet (the space stored with the weights, checked against the preset)."""
        size = name.removeprefix('random-one-shot-')
        if weights is None:
            return SupernetCheckpoint(build_supernet(cls.preset(size)))
        state_dict, space_kwargs, _ = load_supernet_file(weights, size)
        supernet = build_supernet(space_kwargs)
        supernet.load_state_dict(state_dict)
        return SupernetCheckpoint(supernet)

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


def build_supernet(space_kwargs: Mapping[str, Any]) -> AutoformerSpace:
    """The weight-entangled supernet: the space mutated by NNI's ``RandomOneShot``, initialised as the official one."""
    from nni.nas.strategy import RandomOneShot
    supernet = RandomOneShot().mutate_model(AutoformerSpace(**space_kwargs))
    init_weights(supernet)  # the mutation makes its mixed layers anew, with PyTorch's default init
    return supernet


def set_active_arch(supernet: AutoformerSpace, arch: Mapping[str, Any]) -> None:
    """Make a one-shot supernet run ``arch`` from now on (NNI's resample, with every label given)."""
    memo = complete_arch(arch, supernet.space_kwargs)
    for module in supernet.modules():
        if isinstance(module, BaseSuperNetModule):
            module.resample(memo=memo)


def inherited_subnet(supernet_state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any],
                     space_kwargs: Mapping[str, Any]) -> nn.Module:
    """``AutoformerSpace(**space_kwargs).freeze(arch)`` holding the weights it inherits from the supernet."""
    model = AutoformerSpace(**space_kwargs).freeze(arch)
    model.load_state_dict(sub_state_dict(supernet_state_dict, arch))
    return model


def load_supernet_file(path: str | Path, name: str | Mapping[str, Any] | None = None, layout: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A supernet file read once: its weights in this project's layout, fitted to its space; the space;
    and what the file stores beside the weights (empty for official and NNI hub files).

    ``name``: a preset, constructor kwargs, or None for the space stored in the file (else tiny).
    """
    if path == 'nni':
        size = name if isinstance(name, str) else preset_name(complete_space_kwargs(**name)) if name else 'tiny'
        if size not in SEARCHED:
            raise UserError(f"'nni' downloads NNI's supernets of the tiny, small and base presets, not of "
                            f"{'this space' if size is None else size}: pass --name tiny|small|base, or a weights file")
        path = nni_download(f'autoformer-{size}-supernet')
    state_dict, meta = read_weights(path)
    if is_subnet(state_dict):
        raise UserError(f'{path} holds the weights of one subnet, not a supernet: pass the supernet file it was '
                        'sliced or trained from (evaluate.py reads a subnet file alone)')
    space_kwargs = resolve_space(name, meta.get('space'), path)
    label = name if isinstance(name, str) else 'the space'
    converted = to_project_layout(state_dict, layout or detect_layout(state_dict, path))
    with torch.device('meta'):  # the supernet's shapes only: no memory, no init
        shapes = {k: v.shape for k, v in build_supernet(space_kwargs).state_dict().items()}
    return fit_to_space(converted, shapes, label, path), space_kwargs, meta


def _searched_arch_of(size: str | None) -> dict[str, Any]:
    if size not in SEARCHED:
        raise UserError(f'there is no pre-searched arch for the {size or "given"} space: say which subnet to use '
                        'with --arch (JSON text or file)')
    return searched_arch(size)


def load_model(weights: str | Path | None, name: str | Mapping[str, Any] | None = None,
               arch: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any], dict | None]:
    """A frozen subnet with its weights: ``(model, arch, space_kwargs, data)``, ``data`` the classes and
    preprocessing stored with the weights (None when the file has none).

    ``weights``: None (random init), ``'nni'`` (NNI's AutoFormer-T/S/B download), a subnet file
    (this project's or NNI hub's layout) or a supernet file in any layout, sliced to ``arch``.
    Without ``arch``, the arch stored in a subnet file or the preset's searched arch is used.
    """
    raw, meta = read_weights(weights) if weights not in (None, 'nni') else ({}, {})
    space_kwargs = resolve_space(name, meta.get('space'), weights)
    if isinstance(arch, str):  # smallest or largest
        arch = complete_arch(arch, space_kwargs)
    size = name if isinstance(name, str) else preset_name(space_kwargs)
    if raw and is_subnet(raw):
        file_arch = meta.get('arch') or _searched_arch_of(size)
        if arch is not None and complete_arch(arch, space_kwargs) != complete_arch(file_arch, space_kwargs):
            raise UserError(f'{weights} holds the weights of one subnet ({json.dumps(file_arch)}); '
                            'pass a supernet weights file to evaluate another arch')
        arch, state_dict = file_arch, convert_nni_subnet(raw)
    else:
        arch = arch or _searched_arch_of(size)
        if weights == 'nni':
            state_dict = convert_nni_subnet(torch_load(nni_download(f'autoformer-{size}-subnet'), 'NNI subnet'))
        elif raw:
            supernet = load_supernet_file(weights, space_kwargs)[0]
            state_dict = sub_state_dict(supernet, complete_arch(arch, space_kwargs))
        else:
            state_dict = None
    model = AutoformerSpace(**space_kwargs).freeze(arch)
    if state_dict is not None:
        load_checked(model, state_dict, str(weights))
    return model, dict(arch), space_kwargs, meta.get('data')
