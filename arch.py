"""The rules of the AutoFormer space on plain dicts: presets, archs, counting.

A space is its constructor keywords (``DEFAULTS``); an arch is a dict with ``embed_dim``, ``depth``, and per layer
``mlp_ratio_{i}`` and ``num_head_{i}`` (NNI hub's labels). Checks that name the label and the allowed values, and
counts by the official rule. It builds no model and imports no library (the scripts check their flags with it before
torch loads); slicing a subnet's weights is ``checkpoints.py``'s.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from typing import Any, Callable, Mapping

HEAD_DIM = 64  # the width of every attention head, as the official model
STEM_STRIDE = 4  # the convolutional stem halves the side twice


class SpaceError(ValueError):
    """An arch or space argument that does not fit the space; the message names the label and what is allowed."""


PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(search_embed_dim=(192, 216, 240), search_mlp_ratio=(3.0, 3.5, 4.0),
                 search_num_heads=(3, 4), search_depth=(12, 13, 14)),
    'small': dict(search_embed_dim=(320, 384, 448), search_mlp_ratio=(3.0, 3.5, 4.0),
                  search_num_heads=(5, 6, 7), search_depth=(12, 13, 14)),
    'base': dict(search_embed_dim=(528, 576, 624), search_mlp_ratio=(3.0, 3.5, 4.0),
                 search_num_heads=(8, 9, 10), search_depth=(14, 15, 16)),
    # Sized for a laptop CPU and the bundled 32 px digits; also the space of the official cases in tests/golden.
    'demo': dict(search_embed_dim=(96, 112, 128), search_mlp_ratio=(3.0, 3.5, 4.0), search_num_heads=(1, 2),
                 search_depth=(2, 3, 4), img_size=32, patch_size=8, num_labels=10),
    # Sized for 28 px images (Fashion-MNIST) on a CPU: 7-pixel patches (a 4x4 grid), as smaller ones learn no
    # faster per image and run slower; embed dims from 64 and depths from 1, so that the subnets differ enough
    # in accuracy for a search to tell them apart (measurements: bench/results/space-notes.md).
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
    absolute_position=True, qk_scale=None, rpe=True, rpe_length=None, conv_stem=0,
)


def is_int(value: Any, least: int = 1) -> bool:
    """An int (not a bool) of ``least`` or more."""
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
        ok = (lambda v: is_number(v) and v > 0) if ratios else is_int
        if not isinstance(values, (list, tuple)) or not values or not all(ok(v) for v in values):
            kind = 'positive numbers' if ratios else 'positive integers'
            return f'{key} must be a non-empty list of {kind}, got {values!r}'
    for key in ('img_size', 'patch_size', 'in_channels'):
        if not is_int(space_kwargs[key]):
            return f'{key} must be a positive integer, got {space_kwargs[key]!r}'
    if space_kwargs['img_size'] < space_kwargs['patch_size']:
        return f'img_size {space_kwargs["img_size"]} is smaller than patch_size {space_kwargs["patch_size"]}'
    if space_kwargs['img_size'] % space_kwargs['patch_size']:  # the patch conv would drop the border silently
        return f'img_size {space_kwargs["img_size"]} is not a multiple of patch_size {space_kwargs["patch_size"]}'
    stem = space_kwargs['conv_stem']
    if not is_int(stem, 0) or stem == 1:
        return f'conv_stem must be 0 (none) or a number of channels of 2 or more, got {stem!r}'
    if stem and space_kwargs['patch_size'] % STEM_STRIDE:
        return (f'patch_size {space_kwargs["patch_size"]} is not a multiple of {STEM_STRIDE}, the conv_stem\'s stride: '
                'use no stem (conv_stem 0) or patches of a multiple of 4 px')
    if not is_int(space_kwargs['num_labels'], 0):
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
    if space_kwargs['rpe_length'] is not None and not is_int(space_kwargs['rpe_length']):
        return f'rpe_length must be a positive integer or null, got {space_kwargs["rpe_length"]!r}'
    return None


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


def preset_space(name: str) -> dict[str, Any]:
    """Constructor keywords of a preset search space: ``tiny``, ``small`` or ``base`` (``AutoformerSpace.preset``)."""
    if name not in PRESETS:
        raise SpaceError(f'unknown preset {name!r}: choose one of {", ".join(PRESETS)}')
    return copy.deepcopy(PRESETS[name])


def preset_name(space_kwargs: Mapping[str, Any]) -> str | None:
    """The preset whose search space ``space_kwargs`` has, if any."""
    return next((name for name, preset in PRESETS.items()
                 if all(list(preset[k]) == list(space_kwargs[k]) for k in SEARCH_KEYS)), None)


def make_arch(embed_dim: int, mlp_ratios: list[float], num_heads: list[int]) -> dict[str, Any]:
    """An arch dict from per-layer lists (their common length is the depth)."""
    arch: dict[str, Any] = {'embed_dim': embed_dim, 'depth': len(mlp_ratios)}
    for i, (ratio, heads) in enumerate(zip(mlp_ratios, num_heads, strict=True)):
        arch[f'mlp_ratio_{i}'] = ratio
        arch[f'num_head_{i}'] = heads
    return arch


def searched_arch(name: str) -> dict[str, Any]:
    """The architecture of AutoFormer-T/S/B (``autoformer-tiny`` or just ``tiny``, ...)."""
    size = name.removeprefix('autoformer-')
    if size not in SEARCHED:
        raise SpaceError(f'unknown searched model {name!r}: choose one of '
                         f'{", ".join("autoformer-" + s for s in SEARCHED)}')
    embed_dim, ratios, heads = SEARCHED[size]
    return make_arch(embed_dim, ratios, heads)


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


# Labels of layers past the space's depth are ignored like those past the arch's depth.
_LAYER_LABEL = re.compile(r'(mlp_ratio|num_head)_\d+')


def _check_label(arch: Mapping[str, Any], label: str, allowed: list) -> None:
    if label not in arch:
        raise SpaceError(f'arch is missing the label {label!r} (allowed values: {allowed})')
    value, ratio = arch[label], label.startswith('mlp_ratio')
    if not (is_number(value) if ratio else is_int(value, least=-2**63)):
        raise SpaceError(f'arch value {label}={value!r} must be {"a number" if ratio else "an integer"} '
                         f'(allowed values: {allowed})')
    if value not in allowed:
        raise SpaceError(f'arch value {label}={value!r} is outside the space (allowed values: {allowed})')


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


def _num_patches(space_kwargs: Mapping[str, Any]) -> int:
    return (space_kwargs['img_size'] // space_kwargs['patch_size']) ** 2


def _stem(space_kwargs: Mapping[str, Any]) -> tuple[list[tuple[int, int, int]], int]:
    """The conv stem's convolutions (in, out, output side) and the patch embedding's input per token."""
    stem, side, patch = space_kwargs['conv_stem'], space_kwargs['img_size'], space_kwargs['patch_size']
    if not stem:
        return [], space_kwargs['in_channels'] * patch ** 2
    convs = [(space_kwargs['in_channels'], stem // 2, -(-side // 2)), (stem // 2, stem, -(-side // 4))]
    return convs, stem * (patch // STEM_STRIDE) ** 2


def count_params(arch: Mapping[str, Any], **space_kwargs: Any) -> int:
    """Parameters of a subnet by the official rule (``get_sampled_params_numel``); exact."""
    space_kwargs = complete_space_kwargs(**space_kwargs)
    check_arch(arch, space_kwargs)
    embed = arch['embed_dim']
    table_rows = 2 * space_kwargs['rpe_length'] + 2
    convs, per_token = _stem(space_kwargs)
    total = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out, _ in convs)              # stem: convs, BatchNorms
    total += embed * per_token + embed                                                 # patch embed
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
    convs, per_token = _stem(space_kwargs)
    total = sum(side * side * 9 * c_in * c_out for c_in, c_out, side in convs)
    total += patches * embed * per_token
    for e, q, hidden in layer_dims(arch):
        total += tokens * e * 3 * q + 2 * tokens * tokens * q + tokens * q * e     # qkv, qk^T, attn v, proj
        if space_kwargs['rpe']:
            total += 4 * tokens * q * table_rows                                   # rpe on keys and values
        total += 2 * tokens * e * hidden                                           # fc1, fc2
    return total + embed * space_kwargs['num_labels']
