"""The device and the numeric precision a run computes in: ``--device`` resolved, mixed precision on CUDA by
default, fp16 refused on the CPU."""
from __future__ import annotations

import logging
import sys

import torch

from utils import PRECISIONS, UserError


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA when present; says so when it falls back to the CPU."""
    if requested:
        if requested.startswith('cuda') and not torch.cuda.is_available():
            logging.getLogger(__name__).warning('--device %s asked for but no CUDA GPU is visible; using the CPU',
                                                requested)
            return torch.device('cpu')
        device = torch.device(requested)
        if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f'--device {requested}: only {torch.cuda.device_count()} CUDA GPUs are visible')
        return device
    if torch.cuda.is_available():
        return torch.device('cuda')
    print('No CUDA GPU found: running on the CPU (slower).', file=sys.stderr)
    return torch.device('cpu')


# The autocast dtype of each --precision (utils.PRECISIONS, Lightning's names).
AUTOCAST = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16)))


def default_precision(cuda: bool) -> str:
    """Mixed precision on CUDA, as the official AMP: ``bf16-mixed`` where the GPU has bf16, else ``16-mixed``;
    fp32 on the CPU, where autocast is slower."""
    return ('bf16-mixed' if torch.cuda.is_bf16_supported() else '16-mixed') if cuda else '32-true'


def set_up_precision(precision: str | None, tf32: bool, cuda: bool, doing: str) -> str:
    """The precision to run in: ``precision`` (``--precision``), else :func:`default_precision`; ``doing``
    names the work.

    On CUDA it also turns on cuDNN autotuning (fixed input sizes) and, with ``--tf32``, TF32 tensor
    cores for fp32 matmuls and convs (off by default: 10 mantissa bits move outputs by about 1e-3).
    On the CPU, ``bf16-mixed`` runs CPU autocast (with a note: usually slower there); fp16 is refused.
    """
    precision = precision or default_precision(cuda)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        return precision
    if precision == '16-mixed':
        raise UserError('--precision 16-mixed needs CUDA: on the CPU pass bf16-mixed (CPU autocast) or 32-true')
    if precision == 'bf16-mixed':
        logging.getLogger(__name__).warning('--precision bf16-mixed on the CPU: %s under CPU autocast, usually '
                                            'slower there than fp32', doing)
    return precision
