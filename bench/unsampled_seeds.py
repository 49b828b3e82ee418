"""The optimizer on the layers a step did not sample, measured over seeds: the official behaviour (AdamW decays and
moves every layer used once, sampled or not) against ``--skip-unsampled`` (it leaves them alone), each trained with
a recipe's defaults, its smallest and largest subnets evaluated on the test split (top-1). The folder recipe
trains on bench/thin_details.py's images (2,000 of 300 px, four imbalanced classes, no test split) and reports
the last epoch's balanced accuracy on their val/, the figure its runs are ranked by.

    python bench/unsampled_seeds.py --dataset digits --seeds 0 1 2      # writes bench/results/unsampled-digits.md
    python bench/unsampled_seeds.py --dataset fashion-mnist --seeds 0 1
    python bench/unsampled_seeds.py --dataset folder --seeds 0 1 2

Prints and writes the table (mean and its standard error over the seeds); asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arch import extreme_arch  # noqa: E402
from checkpoints import read_weights  # noqa: E402
from metrics import mean_se, plus_minus  # noqa: E402
from thin_details import write_data  # noqa: E402

FIGURE = ('Test top-1', "Balanced accuracy on val/ (the last epoch's validation)")
WAYS = {'official': ['--no-skip-unsampled'], 'skip-unsampled': ['--skip-unsampled']}


def run(data: list[str], seed: int, flags: list[str], output: Path) -> dict[str, float]:
    """Train with the recipe's defaults, then the figures of the smallest and the largest subnet."""
    if not (output / 'supernet.pth').is_file():
        subprocess.run([sys.executable, 'scratch.py', *data, '--seed', str(seed), *flags, '--output',
                        str(output)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    # Training's time, also for a run reused from an earlier call: from its record (written as training starts,
    # after the data checks) to its weights.
    figures = {'minutes': ((output / 'supernet.pth').stat().st_mtime - (output / 'run.json').stat().st_mtime) / 60}
    if data[1] == 'folder':
        metrics = json.loads((output / 'metrics.json').read_text())
        return {**figures, 'smallest': metrics['val_balanced_min'], 'largest': metrics['val_balanced_max']}
    space = read_weights(output / 'supernet.pth')[1]['space']
    for name, pick in (('smallest', min), ('largest', max)):
        subprocess.run([sys.executable, 'evaluate.py', '--weights', str(output / 'supernet.pth'), *data,
                        '--arch', json.dumps(extreme_arch(space, pick)), '--split', 'test', '--output',
                        str(output / name)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        figures[name] = json.loads((output / name / 'results.json').read_text())['top1']
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', default='digits', choices=['digits', 'fashion-mnist', 'folder'],
                        help="the recipe: digits's, fashion-mnist's, or a folder's (on bench/thin_details.py's images)")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--work', default='outputs/unsampled-seeds')
    args = parser.parse_args()
    work = Path(args.work).resolve() / args.dataset
    data = ['--dataset', args.dataset]
    if args.dataset == 'folder':
        images = work / 'thin-details'
        if not images.is_dir():
            write_data(images, 2000, 300, seed=0)
        data.extend(['--datapath', str(images)])
    results = {way: [run(data, seed, flags, work / f'{way}-{seed}') for seed in args.seeds]
               for way, flags in WAYS.items()}
    lines = [f'# AdamW on unsampled layers, {args.dataset}, seeds {" ".join(map(str, args.seeds))} '
             f'(`python bench/unsampled_seeds.py --dataset {args.dataset} --seeds {" ".join(map(str, args.seeds))}`)',
             '', f'{FIGURE[args.dataset == "folder"]} of the smallest and the largest subnet of a supernet trained '
             'with the recipe\'s defaults; mean ± standard error over the seeds, then each seed.', '',
             '| way | smallest | largest | per seed (smallest / largest) | minutes of training per run |',
             '|---|---|---|---|---|']
    for way, runs in results.items():
        lines.append(f"| {way} | {plus_minus(*mean_se([r['smallest'] for r in runs]))} | "
                     f"{plus_minus(*mean_se([r['largest'] for r in runs]))} | "
                     + ', '.join(f"{r['smallest']:.2f} / {r['largest']:.2f}" for r in runs)
                     + f" | {statistics.mean(r['minutes'] for r in runs):.1f} |")
    report = ROOT / 'bench' / 'results' / f'unsampled-{args.dataset}.md'
    report.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
