"""Search overhead per candidate beyond the pure forward passes over the cached search split.

    python bench/search_overhead.py --engine sequential
    python bench/search_overhead.py --engine ts sequential --small 2 --large 6
    python bench/search_overhead.py --engine ts --small 2 --large 6 --concurrency 2

Runs the same random search (demo space, digits) with ``--small`` and ``--large`` trials and takes
the marginal seconds per candidate, so start-up costs cancel out; then subtracts the time the
forward passes alone take for those candidates. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import search_data  # noqa: E402
import search  # noqa: E402
from engine import evaluate  # noqa: E402
from checkpoints import save_weights  # noqa: E402
from arch import complete_space_kwargs  # noqa: E402
from space import AutoformerSpace, build_supernet, inherited_subnet  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--engine', choices=['sequential', 'ts'], nargs='+', default=['sequential'],
                        help='NNI engine(s), measured one after the other')
    parser.add_argument('--small', type=int, default=8, help='trials of the shorter search')
    parser.add_argument('--large', type=int, default=32, help='trials of the longer search')
    parser.add_argument('--port', type=int, default=8765, help='web UI port (ts)')
    parser.add_argument('--concurrency', type=int, default=1, help='trials at once (ts)')
    return parser.parse_args()


DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # where search.py evaluates by default


def timed_search(workdir: Path, weights: Path, trials: int, engine: str,
                 args: argparse.Namespace) -> tuple[float, list[dict]]:
    output = workdir / f'search-{engine}-{trials}'
    start = time.perf_counter()
    search.main(['--weights', str(weights), '--trials', str(trials), '--engine', engine, '--num-workers', '0',
                 '--port', str(args.port), '--concurrency', str(args.concurrency), '--output', str(output),
                 '--experiment-dir', str(workdir / 'nni')])
    return time.perf_counter() - start, json.loads((output / 'candidates.json').read_text())


def forward_seconds(weights: Path, cache: Path, records: list[dict], space_kwargs: dict) -> float:
    """Mean seconds of the forward passes alone over the cached split, per candidate."""
    supernet = torch.load(weights, weights_only=True)['state_dict']
    split = search_data.CachedSplit(cache)
    total = 0.0
    for record in records:
        model = inherited_subnet(supernet, record['arch'], space_kwargs)
        start = time.perf_counter()
        evaluate(model, split.batches(256), DEVICE, progress=False)
        total += time.perf_counter() - start
    return total / len(records)


def main() -> None:
    args = parse_args()
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    per_candidate = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        weights = workdir / 'supernet.pth'
        save_weights(weights, build_supernet(space_kwargs).state_dict(), space_kwargs)
        for engine in args.engine:
            small_time, _ = timed_search(workdir, weights, args.small, engine, args)
            large_time, records = timed_search(workdir, weights, args.large, engine, args)
            per_candidate[engine] = (large_time - small_time) / (args.large - args.small)
            forward = forward_seconds(weights, workdir / f'search-{engine}-{args.large}' / 'search-data.pt', records,
                                      space_kwargs)
            name = f'{engine} concurrency {args.concurrency}' if engine == 'ts' else engine
            overhead = per_candidate[engine] - forward
            print(f'search_overhead engine {name}: {per_candidate[engine]:.3f} s per candidate, '
                  f'forward alone {forward:.3f} s, overhead {overhead:.3f} s '
                  f'({100 * overhead / forward:.0f}% of forward)')
    if len(args.engine) == 2:
        first, second = args.engine
        print(f'search_overhead {first} beyond {second}: '
              f'{per_candidate[first] - per_candidate[second]:.3f} s per candidate')


if __name__ == '__main__':
    main()
