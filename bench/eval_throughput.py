"""Subnet evaluation throughput: images/s of a frozen subnet and of the supernet running that arch.

    python bench/eval_throughput.py --name tiny --batch-size 8 --threads 2 --reference
    python bench/eval_throughput.py --name tiny --batch-size 128 --device cuda --precision bf16

The arch is the preset's pre-searched one (AutoFormer-T/S/B). Prints figures, asserts nothing.
Each timed forward of the frozen subnet is followed (or preceded) by the same forward of the
supernet running that arch and, with ``--reference``, of the subnet in the official formulation
(``bench/reference.py``). ``--compiled`` adds the frozen subnet compiled and the supernet as one compiled graph
for every arch running it (``masked_supernet.py``, as ``search.py --compile`` evaluates candidates).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import (COMPILED, OFFICIAL, OTHER_ATTENTION, OURS, add_timing_args, autocast, compiled,  # noqa: E402
                    interleaved_seconds, interleaved_summary, peak_memory, preset_space, set_up, with_other_attention)
from masked_supernet import MaskedSupernet  # noqa: E402
from reference import in_official_formulation  # noqa: E402
from arch import count_flops, extreme_arch  # noqa: E402
from space import AutoformerSpace, build_supernet, set_active_arch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(parser, 'forwards')
    return parser.parse_args()


def inference(model: torch.nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    @torch.no_grad()
    def forward() -> None:
        with autocast(images.device, precision):
            model(images)
    return forward


def main() -> None:
    args = parse_args()
    device = set_up(args)
    space_kwargs = preset_space(args)
    arch = AutoformerSpace.searched_arch(args.name)
    subnet = AutoformerSpace(**space_kwargs).freeze(arch).eval().to(device)
    supernet = build_supernet(space_kwargs).eval().to(device)
    set_active_arch(supernet, arch)
    images = torch.randn(args.batch_size, 3, space_kwargs['img_size'], space_kwargs['img_size'], device=device)
    forwards = {OURS: inference(subnet, images, args.precision),
                'supernet running the subnet': inference(supernet, images, args.precision)}
    if args.reference:
        forwards[OFFICIAL] = functools.partial(in_official_formulation, forwards[OURS])
    if args.compiled:
        masked = MaskedSupernet(supernet).eval()
        masked.set_arch(arch)
        forwards[COMPILED] = inference(compiled(masked, args), images, args.precision)
        forwards['frozen subnet compiled'] = inference(compiled(subnet, args), images, args.precision)
    if args.attention:
        forwards[OTHER_ATTENTION] = with_other_attention(forwards[OURS], device)
    times = interleaved_seconds(lambda index: forwards, args)
    label = (f'eval autoformer-{args.name} frozen subnet {space_kwargs["img_size"]}px batch {args.batch_size} '
             f'{args.device} {args.precision} threads {torch.get_num_threads()}{peak_memory(device)}')
    flops_per_step = 2 * count_flops(arch, **space_kwargs) * args.batch_size
    print(f'{label}: {interleaved_summary(times, args.batch_size, flops_per_step, args.peak_tflops)}')
    if args.compiled:
        largest = count_flops(extreme_arch(space_kwargs, max), **space_kwargs)
        print(f"FLOP/s above count the searched arch's MACs; the compiled graph computes the largest arch's "
              f'({largest / count_flops(arch, **space_kwargs):.2f}x)')


if __name__ == '__main__':
    main()
