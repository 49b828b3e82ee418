"""Weights files: safe reading, atomic writing, the official and NNI-hub layouts, fitting to a space.

Every weights file this project writes is ``{'space': constructor kwargs, 'state_dict': ..., ['arch': ...]}``. Reading
one checks everything a file can get wrong (code to run, damaged archives, a stored space that is no space, tensors that
are not plain floating-point weights, NaN) and says so in one line. Official AutoFormer (Cream) and NNI-hub supernets
are detected from their keys and converted to this project's layout; wider supernets are sliced to the space, a
subnet's exact weights from a supernet (``sub_state_dict``), and the position embedding resampled to another input
size. Also: NNI's download of its published weights and the standalone TorchScript / ONNX export of a subnet;
``torch_load`` and ``atomic_torch_save`` serve every torch file (the search split's cache, Lightning's checkpoints).
Loading a file into a model (``load_supernet_file``, ``load_model``) is ``space.py``'s, which builds the models.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import urllib.error
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from arch import (DEFAULTS, HEAD_DIM, SEARCH_KEYS, SpaceError, complete_space_kwargs, is_int, is_number, layer_dims,
                  preset_space, space_problem)
from layers import official_qkv_slice
from utils import UserError, atomic_path, atomic_write_bytes, atomic_write_json


def torch_load(path: str | os.PathLike, what: str = 'checkpoint', mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and a clear message for every way a file can be unusable.

    ``mmap``: tensors stay in the file's pages, which the processes reading one file share.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f'{what} file {path} is not a regular file (a folder or a device): give the weights file')
    if not path.is_file():
        raise UserError(f'{what} file {path} does not exist (check the path, or convert/download the weights first)')
    if path.stat().st_size == 0:
        raise UserError(f'{what} file {path} is empty (0 bytes): the file was not written completely; '
                        'download or convert it again')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        code = re.search(r'GLOBAL ([\w.]+)', str(err))
        if code:  # a class or function to import and call: code from the file would run
            raise UserError(f'{what} file {path} needs to run code to load (it calls {code.group(1)}), which is '
                            'refused: a weights file must hold only tensors. Get a plain state dict '
                            '(torch.save(model.state_dict(), path)) from its source') from None
        raise UserError(f'{what} file {path} is corrupt or truncated ({unpickler_detail(err)}); '
                        'download or convert it again') from None
    except Exception as err:  # whatever a damaged archive makes the unpickler raise
        raise UserError(f'{what} file {path} is corrupt or truncated ({type(err).__name__}: {err}); '
                        'download or convert it again') from None


def unpickler_detail(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what was wrong; never its advice to load with
    ``weights_only=False``, which is no help for a damaged file and unsafe for a hostile one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if 'WeightsUnpickler error:' in line:
            return line[line.index('WeightsUnpickler error:'):]
    useful = [line for line in lines if 'weights_only' not in line and not line.startswith('Check the documentation')]
    return useful[0] if useful else type(err).__name__


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Save with ``torch.save`` so that ``path`` is never half-written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: a full disk then shows as an OSError from the write
    atomic_write_bytes(buffer.getbuffer(), path)


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                 **extra: Any) -> None:
    """Write weights with the space they belong to (and e.g. ``arch=`` for a subnet), atomically."""
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in complete_space_kwargs(**space_kwargs).items()}
    atomic_torch_save({'space': stored, 'state_dict': dict(state_dict), **extra}, path)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a weights file and what is stored beside it (``space``, ``arch``, ``data``: the classes
    and preprocessing it was trained with; empty for foreign files)."""
    checkpoint = torch_load(path, 'weights')
    meta = {k: v for k, v in checkpoint.items() if k in ('space', 'arch', 'data')} \
        if isinstance(checkpoint, Mapping) else {}
    state_dict = unwrap_state_dict(checkpoint, path)
    check_weight_tensors(state_dict, path)
    return state_dict, meta


def resolve_space(name: str | Mapping[str, Any] | None, stored: Mapping[str, Any] | None,
                  path: Any = '') -> dict[str, Any]:
    """The space of a weights file: ``name`` when it is constructor keywords, else the stored one (checked
    against the preset ``name``), else the preset ``name``."""
    if isinstance(name, Mapping):  # an explicit space (--space-file): the weights are fitted to it by shape
        return complete_space_kwargs(**name)
    if stored is None:
        return complete_space_kwargs(**preset_space(name or 'tiny'))
    if not isinstance(stored, Mapping) or set(stored) - set(DEFAULTS) or set(SEARCH_KEYS) - set(stored):
        unknown = sorted(set(stored) - set(DEFAULTS)) if isinstance(stored, Mapping) else type(stored).__name__
        raise UserError(f'{path}: its stored space is not a space ({unknown}): the file is damaged or not '
                        "this project's; convert the original checkpoint again")
    problem = space_problem({**DEFAULTS, **stored})
    if problem:
        raise UserError(f'{path}: its stored space is unusable ({problem}): the file is damaged; convert or '
                        'train it again')
    if name is not None:
        preset = preset_space(name)
        for key in SEARCH_KEYS:
            if list(preset[key]) != list(stored[key]):
                raise UserError(f'{path} holds weights of another space ({key}={list(stored[key])}), '
                                f'not of preset {name} ({key}={list(preset[key])}); drop --name or pass the '
                                'matching weights')
    return complete_space_kwargs(**stored)


def is_subnet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return 'patch_embed_super.proj.weight' not in state_dict and (  # an official supernet's blocks are not nested
        'blocks.0.attn.qkv.weight' in state_dict or 'blocks.0.attn.q.weight' in state_dict)


def unwrap_state_dict(checkpoint: Any, path: Any = '') -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``{'model': ...}``, ``{'state_dict': ...}`` or plain)."""
    if isinstance(checkpoint, Mapping):
        for key in ('model', 'state_dict'):
            if isinstance(checkpoint.get(key), Mapping):
                return unwrap_state_dict(checkpoint[key], path)
        if checkpoint and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
            return dict(checkpoint)
    raise UserError(f'{path} holds no state dict of tensors (expected a dict of tensors, '
                    "or one under 'model' or 'state_dict')")


def detect_layout(state_dict: Mapping[str, torch.Tensor], path: Any = '') -> str:
    """``official`` (Cream), ``nni`` (NNI hub after RandomOneShot) or ``project`` (this project's)."""
    keys = set(state_dict)
    if 'patch_embed_super.proj.weight' in keys:
        return 'official'
    if 'blocks.blocks.0.attn.q.weight' in keys:
        return 'nni'
    if 'blocks.blocks.0.attn.qkv.weight' in keys:
        return 'project'
    raise UserError(f'{path}: not an AutoFormer supernet checkpoint (no official, NNI hub or project '
                    'keys such as patch_embed_super.proj.weight or blocks.blocks.0.attn.qkv.weight)')


def to_project_layout(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename (and for NNI hub, re-pack q/k/v) a supernet state dict into this project's layout."""
    if layout == 'project':
        return dict(state_dict)
    if layout == 'official':
        return {_official_key(k): v for k, v in state_dict.items()}
    if layout == 'nni':
        return convert_nni_subnet(state_dict, interleave=True)
    raise UserError(f'unknown checkpoint layout {layout!r}: choose official, nni or project')


def _official_key(key: str) -> str:
    if key.startswith('patch_embed_super.proj.'):
        return 'patch_embed.' + key[len('patch_embed_super.proj.'):]
    if key in ('cls_token', 'pos_embed'):
        return f'{key}.{key}'
    if key.startswith('blocks.'):
        return 'blocks.' + key
    return key


def convert_nni_subnet(state_dict: Mapping[str, torch.Tensor], interleave: bool = False) -> dict[str, torch.Tensor]:
    """NNI hub keeps q, k, v apart: an NNI hub subnet as this project's subnet (one q;k;v linear), or with
    ``interleave`` a supernet, whose per-head weight rows interleave; the biases concatenate in both."""
    result = {}
    for key, tensor in state_dict.items():
        prefix, _, name = key.rpartition('.attn.')
        if name in ('q.weight', 'q.bias'):
            kind = name.split('.')[1]
            parts = [state_dict[f'{prefix}.attn.{p}.{kind}'] for p in 'qkv']
            joined = torch.stack(parts, dim=1).flatten(0, 1) if interleave and kind == 'weight' else torch.cat(parts)
            result[f'{prefix}.attn.qkv.{kind}'] = joined
        elif name not in ('k.weight', 'v.weight', 'k.bias', 'v.bias'):
            result[key] = tensor
    return result


# Dims that must match exactly; all others may be wider in the checkpoint and are prefix-sliced.
# The qkv rows fix the head count, which tells the presets apart (tiny 4, small 7, base 10).
_EXACT_DIMS = {'attn.qkv.weight': (0,), 'attn.qkv.bias': (0,), 'head.weight': (0,), 'head.bias': (0,),
               'pos_embed.pos_embed': (0, 1), 'cls_token.cls_token': (0, 1), 'embeddings_table_v': (0,),
               'embeddings_table_h': (0,), 'patch_embed.weight': (1, 2, 3)}


def fit_to_space(state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], label: str,
                 path: Any = '') -> dict[str, torch.Tensor]:
    """Slice a (possibly wider) supernet to the space's shapes; refuse what cannot fit, naming the tensor."""
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise UserError(f'{path}: tensor {missing[0]} (shape {tuple(shapes[missing[0]])}) needed by {label} is '
                        f'missing ({len(missing)} missing in all): the checkpoint is not a '
                        f'{"supernet of this space" if label == "the space" else label + " supernet"}')
    extra = [k for k in state_dict if k not in shapes and not _is_extra_layer(k, shapes)]
    if extra:
        raise UserError(f'{path}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all) for {label}')
    result = {}
    for key, shape in shapes.items():
        tensor = state_dict[key]
        exact = range(tensor.dim()) if key.startswith('stem.') else next(
            (dims for suffix, dims in _EXACT_DIMS.items() if key.endswith(suffix)), ())
        fits = tensor.dim() == len(shape) and all(
            have == need if d in exact else have >= need for d, (have, need) in enumerate(zip(tensor.shape, shape)))
        if not fits:
            raise UserError(f'{path}: tensor {key} has shape {tuple(tensor.shape)} but {label} needs '
                            f'{tuple(shape)}: the checkpoint is for another space or preset')
        result[key] = tensor[tuple(slice(0, n) for n in shape)].clone()
    return result


def adapt_to_input_size(state_dict: dict[str, torch.Tensor], img_size: int, patch_size: int) -> None:
    """Resample the absolute position embedding to the patch grid of ``img_size`` (in place)."""
    if 'pos_embed.pos_embed' not in state_dict:  # a space without absolute position embedding
        return
    pos = state_dict['pos_embed.pos_embed']
    old_grid = math.isqrt(pos.shape[1] - 1)
    new_grid = img_size // patch_size
    if new_grid != old_grid:
        state_dict['pos_embed.pos_embed'] = resample_abs_pos_embed(
            pos, new_size=(new_grid, new_grid), old_size=(old_grid, old_grid), num_prefix_tokens=1)


def _check_arch_fits(state_dict: Mapping[str, torch.Tensor], arch: Mapping[str, Any]) -> None:
    for label in ('embed_dim', 'depth'):
        if label not in arch:
            raise SpaceError(f'arch is missing the label {label!r}')
        if not is_int(arch[label]):
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
        elif key == 'head.bias' or key.startswith('stem.'):
            result[key] = tensor
        else:  # patch_embed.*, norm.*
            result[key] = tensor[:embed]
    return {k: v.clone() for k, v in result.items()}


def _is_extra_layer(key: str, shapes: Mapping[str, torch.Size]) -> bool:
    """Layers past the space's maximum depth in a deeper checkpoint are dropped, like any wider dim."""
    if not key.startswith('blocks.blocks.'):
        return False
    return f'blocks.blocks.0.{key.split(".", 3)[3]}' in shapes


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weight_tensors(state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """Refuse what a weights file must not hold: tensors that are not real floating point (an int64
    copy of the weights rounds every value), sparse or meta tensors (no values), NaN or Inf."""
    for key, tensor in state_dict.items():
        if tensor.layout != torch.strided or tensor.is_meta:
            kind = 'a meta tensor (no values)' if tensor.is_meta else f'a {tensor.layout} tensor'
            raise UserError(f'{source}: tensor {key} is {kind}, not plain weights: the file is damaged or '
                            'was not written as weights; save dense tensors')
        batch_counter = key.endswith('.num_batches_tracked') and tensor.dtype == torch.int64  # the stem's BatchNorm
        if tensor.dtype not in WEIGHT_DTYPES and not batch_counter:
            raise UserError(f'{source}: tensor {key} has dtype {tensor.dtype}, not floating point: these are not '
                            'usable weights (the file is damaged or was converted wrongly)')
    check_finite(state_dict, source)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """Refuse weights holding NaN or Inf: they would only spread through training or give garbage."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f'{source}: tensor {key} holds NaN or Inf values: the weights are damaged '
                            '(a diverged run or a corrupt file); use an earlier checkpoint')


def load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                 optional: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` that reports a mismatch as one clear line naming the tensor and both shapes.

    ``optional``: key prefixes that may be absent (they keep the model's values), e.g. ``('head.',)``.
    """
    check_weight_tensors(state_dict, source)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            if key.startswith(optional):
                continue
            raise UserError(f'{source}: tensor {key} is missing: these weights are not for this architecture')
        if state_dict[key].shape != tensor.shape:
            raise UserError(f'{source}: tensor {key} has shape {tuple(state_dict[key].shape)} but the model needs '
                            f'{tuple(tensor.shape)}: these weights are for another architecture or preset')
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise UserError(f'{source}: unexpected tensor {extra[0]} ({len(extra)} in all): these weights are not '
                        'for this architecture')
    model.load_state_dict(state_dict, strict=not optional)


def nni_download(name: str) -> str:
    """Fetch one of NNI's published AutoFormer files with NNI's own mechanism; a clear message offline."""
    from nni.nas.hub.pytorch.utils.pretrained import PRETRAINED_WEIGHT_URLS, load_pretrained_weight
    from nni.common.blob_utils import nni_cache_home
    url = PRETRAINED_WEIGHT_URLS[name]
    local = Path(nni_cache_home()) / 'nashub' / url.split('/')[-1]
    try:
        return load_pretrained_weight(name, download=True, progress=True)
    except (OSError, urllib.error.URLError, RuntimeError, ValueError) as err:
        raise UserError(f'cannot download NNI weights {name} ({type(err).__name__}: {err}). Download {url} '
                        f'on a machine with internet access and put it at {local}') from None


def export_standalone(model: nn.Module, info: Mapping[str, Any], space_kwargs: Mapping[str, Any],
                      folder: str | Path, data: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """The subnet as TorchScript and ONNX files that run without NNI or this project, with a JSON beside them
    that says how to feed it: ``data`` (``data.description``), its classes and preprocessing in numbers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    size = space_kwargs['img_size']
    example = torch.randn(1, space_kwargs['in_channels'], size, size)
    files = {'torchscript': folder / 'subnet.torchscript.pt', 'onnx': folder / 'subnet.onnx',
             'info': folder / 'subnet.json'}
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
        with atomic_path(files['torchscript']) as tmp:
            traced.save(str(tmp))
        with atomic_path(files['onnx']) as tmp:
            torch.onnx.export(model, (example,), str(tmp), input_names=['images'], output_names=['logits'],
                              dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}}, dynamo=False)
    summary = {**info, 'img_size': size, 'classes': data and data.get('classes'),
               'preprocessing': data and data.get('preprocessing'),
               'files': {k: v.name for k, v in files.items() if k != 'info'}}
    atomic_write_json(summary, files['info'])
    return files
