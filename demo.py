"""The whole AutoFormer pipeline on the bundled digits data, end to end on a CPU (``make demo``).

1. train a ``demo`` supernet from scratch (scratch.py);
2. search it under a parameter budget with the paper's evolution, as an NNI experiment (search.py);
3. fine-tune the searched subnet from the weights it inherits (finetune.py --arch);
4. evaluate the searched subnet inherited and fine-tuned, and the smallest and largest, on the test
   split (evaluate.py);
5. write outputs/demo/report.md with the figures and pictures.

Each stage runs the real command line (printed as it starts). A second run reuses the supernet
and the search already in --output; --fresh starts over.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cli import parse_checked, run_main
from outputs import RunFolder, SearchFolder
from plots import save_figure
from arch import canonical_arch, extreme_arch
from utils import UserError, atomic_write_text, read_json

ROOT = Path(__file__).resolve().parent
# What a demo writes into --output; --fresh deletes nothing else.
DEMO_FILES = {'scratch', 'search', 'finetune', 'report.md', 'training.png', 'pareto.png', 'test-searched',
              'test-finetuned', 'test-smallest', 'test-largest', '.lock'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='outputs/demo', metavar='FOLDER', help='folder of every result of the demo')
    parser.add_argument('--max-params', type=float, default=0.25, help='search budget in M parameters')
    parser.add_argument('--engine', choices=['ts', 'sequential'], default='ts',
                        help="search engine (ts: NNI's training service, viewable in the web UI)")
    parser.add_argument('--port', type=int, default=8080, help='web UI port of the search')
    parser.add_argument('--fresh', action='store_true', help='delete --output first and run every stage again')
    return parse_checked(parser, argv)


def run_stage(name: str, args: list[str], times: dict[str, float]) -> None:
    print(f'\n== {name}: python {" ".join(args)}', flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT)
    if result.returncode != 0:
        raise UserError(f'the demo\'s {name} stage failed (exit status {result.returncode}); its output is above')
    times[name] = time.perf_counter() - start


def evaluate_by_script(output: Path, weights: Path, arch: dict | None, name: str, times: dict[str, float]) -> dict:
    """evaluate.py on the digits test split, as a user runs it: its results."""
    results = output / f'test-{name}'
    args = ['evaluate.py', '--weights', str(weights), '--dataset', 'digits', '--split', 'test', '--num-workers', '0',
            '--output', str(results)]
    run_stage(f'evaluate {name}', args + (['--arch', json.dumps(arch)] if arch else []), times)
    return read_json(results / 'results.json')


def plot_training(log_folder: Path, path: Path) -> None:
    """Training loss and the validation top-1 of the smallest and largest subnet, per epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [row for log in sorted(log_folder.glob('version_*/metrics.csv')) for row in csv.DictReader(log.open())]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = [(float(r['step']), float(r['train_loss'])) for r in rows if r.get('train_loss')]
    loss_ax.plot(*zip(*losses), lw=0.8)
    loss_ax.set(xlabel='step', ylabel='training loss')
    for key, label in (('val_acc_min', 'smallest subnet'), ('val_acc_max', 'largest subnet')):
        points = [(int(r['epoch']), float(r[key])) for r in rows if r.get(key)]
        acc_ax.plot(*zip(*points), marker='.', label=label)
    acc_ax.set(xlabel='epoch', ylabel='validation top-1 (%)')
    acc_ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from checkpoints import read_weights  # after the flags: --help and a flag error answer before torch loads
    output = Path(args.output).resolve()
    if args.fresh and output.exists():
        if not output.is_dir() or not {p.name for p in output.iterdir()} <= DEMO_FILES:
            raise UserError(f'--fresh deletes --output, and {output} holds more than a demo\'s results: choose '
                            'another --output')
        shutil.rmtree(output)
    times: dict[str, float] = {}
    training = RunFolder(output / 'scratch')
    supernet = training.weights('supernet')
    if supernet.is_file():
        print(f'reusing the supernet {supernet} (pass --fresh to train again)')
    else:
        interrupted = training.last_checkpoint.is_file()  # an earlier demo was stopped
        run_stage('train', ['scratch.py', '--dataset', 'digits', '--output', str(training.root)]
                  + (['--resume'] if interrupted else []), times)
    search = SearchFolder(output / 'search')
    if search.best.is_file():
        budget = read_json(search.experiment).get('fingerprint', {}).get('max_params')
        if budget != args.max_params:  # the report would quote a budget the search never had
            raise UserError(f'{search} holds a search under --max-params {budget}, not {args.max_params}: pass '
                            '--fresh to run the demo again')
        print(f'reusing the search in {search} (pass --fresh to search again)')
    else:
        shutil.rmtree(search.root, ignore_errors=True)  # an unfinished search starts over
        run_stage('search', ['search.py', '--dataset', 'digits', '--weights', str(supernet), '--strategy',
                             'autoformer', '--max-params', str(args.max_params), '--generations', '3',
                             '--population', '6', '--select', '3', '--mutation-num', '3', '--crossover-num', '3',
                             '--engine', args.engine, '--port', str(args.port),
                             '--num-workers', '0', '--output', str(search.root)], times)
    finetuned = finetune_searched(output, supernet, search.best, times)
    best = read_json(search.best)
    candidates = read_json(search.results_json, list)
    scratch_metrics = read_json(training.metrics)
    searched = evaluate_by_script(output, search.best_subnet, None, 'searched', times)
    tuned = {**evaluate_by_script(output, finetuned.weights('subnet'), None, 'finetuned', times),
             'epochs': read_json(finetuned.metrics)['epochs']}
    space = read_weights(supernet)[1]['space']
    smallest = evaluate_by_script(output, supernet, extreme_arch(space, min), 'smallest', times)
    largest = evaluate_by_script(output, supernet, extreme_arch(space, max), 'largest', times)
    plot_training(training.logs, output / 'training.png')
    shutil.copyfile(search.pareto, output / 'pareto.png')
    report = output / 'report.md'
    atomic_write_text(render_report(best, searched, tuned, smallest, largest, scratch_metrics, len(candidates),
                                    times, args.max_params), report)
    print(f'\nreport: {report}')
    if args.engine == 'ts':
        print(f'web UI of the search: nnictl view {best["experiment_id"]} --port {args.port}   '
              f'(stop it with: nnictl stop --port {args.port})')
    return report


def finetune_searched(output: Path, supernet: Path, best: Path, times: dict[str, float]) -> RunFolder:
    """The searched subnet fine-tuned briefly from its inherited weights (finetune.py's digits recipe)."""
    from checkpoints import read_weights  # here, after the flags: as main's (startup time)
    folder = RunFolder(output / 'finetune')
    subnet = folder.weights('subnet')
    searched = canonical_arch(read_json(best)['arch'])
    if subnet.is_file() and read_weights(subnet)[1].get('arch') == searched:
        print(f'reusing the fine-tuned subnet {subnet} (pass --fresh to fine-tune again)')
        return folder
    interrupted = folder.interrupted('subnet') and folder.record.is_file() and \
        read_json(folder.record).get('arch') == searched
    if not interrupted:
        shutil.rmtree(folder.root, ignore_errors=True)  # a run stopped before its first checkpoint starts over
    run_stage('fine-tune', ['finetune.py', '--dataset', 'digits', '--weights', str(supernet), '--arch', str(best),
                            '--num-workers', '0', '--output', str(folder.root)] + (['--resume'] if interrupted else []),
              times)
    return folder


def render_report(best: dict, searched: dict, tuned: dict, smallest: dict, largest: dict, scratch_metrics: dict,
                  candidates: int, times: dict[str, float], budget: float) -> str:
    def row(name: str, result: dict) -> str:
        return (f"| {name} | {result['top1']:.2f} | {result['params'] / 1e6:.3f} | {result['flops'] / 1e6:.2f} |")

    stage_times = '\n'.join(f'| {name} | {seconds:.0f} |' for name, seconds in times.items()) or \
        '| (every stage reused from an earlier run) | |'
    return f"""# AutoFormer demo on digits

A `demo` supernet trained from scratch on scikit-learn's digits (1,257 training images, 32 px),
searched under a budget of {budget}M parameters with AutoFormer's evolution ({candidates} candidates
evaluated on the 180-image validation split), the searched subnet fine-tuned from the weights it
inherits (`finetune.py --arch`), every subnet evaluated on the 360-image test split.

| subnet | test top-1 (%) | params (M) | FLOPs (M MACs) |
|---|---|---|---|
{row('smallest', smallest)}
{row('largest', largest)}
{row(f'searched (<= {budget}M), inherited weights', searched)}
{row(f"searched, fine-tuned {tuned['epochs']} epochs", tuned)}

Searched arch: `{json.dumps(canonical_arch(best['arch']))}` (search-split top-1 {best['top1']:.2f}%, NNI experiment
`{best['experiment_id']}`). Supernet validation top-1 after {scratch_metrics['epochs']} epochs:
smallest {scratch_metrics['val_acc_min']:.2f}%, largest {scratch_metrics['val_acc_max']:.2f}%.

| stage (this run) | seconds |
|---|---|
{stage_times}

![training curves](training.png)

![top-1 against parameters, Pareto front](pareto.png)
"""


if __name__ == '__main__':
    run_main(main)
