"""The pieces behind the training-step figures, each beside what it replaced (forward + backward).

    python bench/kernels.py --threads 2

Prints figures, asserts nothing: an attention layer with our relative positions, with the
official (direct) ones and with none; the attention matmul at 94 and 96 columns; a supernet
linear layer with ``SlicedLinear`` and with autograd slicing; choosing the arch of a step.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: F401,E402  (quiets NNI 3.0's known warnings, as in the scripts)
from reference import direct_rpe  # noqa: E402
from arch import complete_space_kwargs, sample_arch  # noqa: E402
from layers import Attention, SlicedLinear  # noqa: E402
from space import AutoformerSpace, build_supernet, set_active_arch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--repeats', type=int, default=20, help='timed calls per measurement')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved measurements; the best is kept')
    return parser.parse_args()


def best_ms(functions: dict[str, Callable[[], object]], repeats: int, rounds: int) -> dict[str, float]:
    """Milliseconds per call of each function, the best of interleaved rounds."""
    best = {name: float('inf') for name in functions}
    for function in functions.values():  # warm-up
        for _ in range(3):
            function()
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(repeats):
                function()
            best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1e3)
    return best


def attention_layer(args: argparse.Namespace) -> str:
    x = torch.randn(8, 197, 240, requires_grad=True)
    grad = torch.randn(8, 197, 240)
    layers = {rpe: Attention(240, 4, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0., rpe=rpe,
                             rpe_length=14) for rpe in (False, True)}

    def direct() -> None:
        with direct_rpe():
            layers[True](x).backward(grad)
    ms = best_ms({'none': lambda: layers[False](x).backward(grad),
                  'ours': lambda: layers[True](x).backward(grad), 'official': direct}, args.repeats, args.rounds)
    return (f"attention layer (batch 8, 197 tokens, width 240, 4 heads), forward + backward: "
            f"no relative positions {ms['none']:.1f} ms; ours +{ms['ours'] - ms['none']:.1f} ms; "
            f"official +{ms['official'] - ms['none']:.1f} ms")


def matmul_width(args: argparse.Namespace) -> str:
    figures = []
    for width in (94, 96):
        left, right = torch.randn(32, 197, width), torch.randn(32, width, 197)
        attn, values = torch.randn(32, 197, 197), torch.randn(32, 197, width)
        ms = best_ms({'qk': lambda: left @ right, 'av': lambda: attn @ values}, args.repeats, args.rounds)
        figures.append(f"{width} columns: q.k {ms['qk']:.2f} ms, attn.v {ms['av']:.2f} ms")
    return 'attention matmuls (32 x 197 x 197): ' + '; '.join(figures)


def sliced_linear(args: argparse.Namespace) -> str:
    x = torch.randn(8, 197, 216, requires_grad=True)
    weight, bias = torch.randn(960, 240, requires_grad=True), torch.randn(960, requires_grad=True)
    grad = torch.randn(8, 197, 864)

    def clear() -> None:
        x.grad = weight.grad = bias.grad = None

    def autograd_slicing() -> None:
        clear()
        F.linear(x, weight[:864, :216], bias[:864]).backward(grad)

    def ours() -> None:
        clear()
        SlicedLinear.apply(x, weight, bias, 864, 216).backward(grad)
    ms = best_ms({'autograd': autograd_slicing, 'ours': ours}, args.repeats, args.rounds)
    return (f"supernet fc1 (216 -> 864 of 240 -> 960, batch 8 x 197), forward + backward: "
            f"autograd slicing {ms['autograd']:.2f} ms, SlicedLinear {ms['ours']:.2f} ms "
            f"({ms['ours'] / ms['autograd']:.2f}x the time)")


def arch_choice(args: argparse.Namespace) -> str:
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('tiny'))
    supernet, rng = build_supernet(space_kwargs), random.Random(0)
    ms = best_ms({'set': lambda: set_active_arch(supernet, sample_arch(space_kwargs, rng))}, args.repeats, args.rounds)
    return f"choosing a step's arch (tiny supernet: sample_arch + set_active_arch): {ms['set']:.2f} ms"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'kernels cpu threads {torch.get_num_threads()}')
    for figure in (attention_layer, matmul_width, sliced_linear, arch_choice):
        print(figure(args))


if __name__ == '__main__':
    main()
