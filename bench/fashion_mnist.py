"""The Fashion-MNIST recipe, measured: ``scratch.py --dataset fashion-mnist`` timed from start to end, then
the smallest and the largest subnet on the 10,000 test images, beside the benchmark's published baselines.

    python bench/fashion_mnist.py                        # trains into outputs/bench-fashion-mnist, ~20 min
    python bench/fashion_mnist.py --report bench/results/fashion-mnist-recipe.md

Prints figures and writes a Markdown report; asserts nothing. A run already finished in ``--output`` is not
trained again (its recorded wall time is reported); an unfinished one is refused by scratch.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Zalando's README (github.com/zalandoresearch/fashion-mnist), test top-1 on the same 10,000 images.
BASELINES = [('MLP 256-128-100', 88.33), ('2 conv + pooling, < 100K params', 92.5), ('HOG + SVM', 92.6),
             ('Google AutoML (24 compute hours)', 93.9), ('DENSER (evolutionary NAS)', 95.3), ('human', 83.5)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='outputs/bench-fashion-mnist', metavar='FOLDER',
                        help="scratch.py's --output")
    parser.add_argument('--report', default=None, help='also write the figures as Markdown to this file')
    parser.add_argument('--datapath', default=None, help='Fashion-MNIST folder (default: Debian\'s)')
    parser.add_argument('extra', nargs=argparse.REMAINDER, help='more scratch.py flags, after --')
    return parser.parse_args()


def train(args: argparse.Namespace) -> float:
    """Wall seconds of the training run (measured now, or recorded by the run that trained it)."""
    from outputs import RunFolder

    output = Path(args.output)
    record = output / 'bench-seconds.json'
    if RunFolder(output).weights('supernet').is_file() and record.is_file():
        return json.loads(record.read_text())['seconds']
    command = [sys.executable, 'scratch.py', '--dataset', 'fashion-mnist', '--output', str(output),
               *(['--datapath', args.datapath] if args.datapath else []), *[a for a in args.extra if a != '--']]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({'seconds': seconds, 'command': command[1:]}))
    return seconds


def main() -> None:
    args = parse_args()
    seconds = train(args)
    import data
    import samplers
    from engine import evaluate
    from outputs import RunFolder
    from checkpoints import read_weights
    from arch import complete_space_kwargs, count_params, extreme_arch
    from space import load_model

    folder = RunFolder(Path(args.output))
    weights = str(folder.weights('supernet'))
    test = samplers.build_loader(data.build_dataset('fashion-mnist', args.datapath, 'test', 28), 500, 0)
    rows = []
    space_kwargs = complete_space_kwargs(**read_weights(weights)[1]['space'])
    for label, pick in (('smallest', min), ('largest', max)):
        model, arch = load_model(weights, None, extreme_arch(space_kwargs, pick))[:2]
        top1 = evaluate(model, test, 'cpu', progress=False)['top1']
        rows.append((label, count_params(arch, **space_kwargs) / 1e6, top1))
    metrics = json.loads(folder.metrics.read_text())
    lines = ['# Fashion-MNIST recipe: `scratch.py --dataset fashion-mnist`', '',
             f'Trained in {seconds / 60:.1f} min wall time ({metrics["epochs"]} epochs) on {os.cpu_count()} CPU cores '
             f'({platform.processor() or platform.machine()}), measured by `python bench/fashion_mnist.py`.', '',
             '| model | params (M) | test top-1 (%) |', '|---|---|---|']
    lines += [f'| {label} subnet of the `fashion` supernet (inherited weights) | {params:.3f} | {top1:.2f} |'
              for label, params, top1 in rows]
    lines += [f'| {name} (published) | | {top1} |' for name, top1 in BASELINES]
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == '__main__':
    main()
