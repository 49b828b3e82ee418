"""Does the search work on this supernet? The paper's claims measured, and a user's check of a supernet.

    python study.py --weights outputs/scratch-fashion-mnist/supernet.pth --dataset fashion-mnist   # the check
    python study.py --weights W --dataset fashion-mnist --parts all --output bench/results/study-fashion-mnist
    python study.py --weights W --datapath path/to/imagenet --parts all --gpus 8 --batch-size 256

Parts (``--parts``, comma-separated, or ``all``; each writes ``<output>/<part>.json``, and ``report.md`` is
rebuilt from every part present, so parts can run one at a time):

* ``spread``: inherited top-1 of the smallest, the largest and ``--subnets`` random subnets on the search
  split (what the search ranks on: held out from the test set) and on the test split; Kendall tau between
  the two, and between parameter count and test top-1 (the ranking that needs no supernet).
* ``control``: the same subnets on the supernet with every tensor's entries permuted (a supernet that learned
  nothing, with the same weight statistics). Its search ranking against the trained supernet's test ranking
  must come out near zero, or the study could not fail.
* ``finetune``: ``--finetune-subnets`` of the random subnets fine-tuned (``finetune.py --arch``); Kendall tau
  between inherited and fine-tuned test top-1 (the paper's claim that inherited weights rank like trained),
  and between search top-1 and fine-tuned (with the control's, when the control part ran).
* ``evolution``: ``search.py --strategy autoformer`` against ``--strategy random`` at equal candidates under
  ``--max-params`` (default: the median of the random subnets), ``--seeds`` seeds each.
* ``pick``: the first autoformer search's pick, the median random subnet in the budget and the widest
  uniform subnet in it: inherited, fine-tuned and retrained (``scratch.py --arch``) test top-1.

The check (the default ``--parts spread,control``) reads only ``--weights`` and the data.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from cli import (add_data_args, add_device_arg, add_gpus_arg, add_name_arg, add_precision_args, parse_checked, run_main,
                 space_arg)
import folders
import recipes
from metrics import kendall, mean_se, paired_difference
from arch import arch_choices, arch_key, count_params, extreme_arch, make_arch, preset_name, sample_arch
from outputs import RunFolder, SearchFolder
from study_report import PARTS, plot, report, summary_line
from utils import UserError, atomic_write_json, atomic_write_text, check_writable, lock_output, read_json

if TYPE_CHECKING:  # the heavy modules load after the flags (startup time): each function that needs one imports it
    import torch
    from search_data import CachedSplit

CHECK = ('spread', 'control')
QUICK = dict(subnets=12, test_images=2000, control_draws=3, finetune_subnets=4, seeds=2, population=4, generations=2,
             finetune_epochs=1, retrain_epochs=1)
ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_name_arg(parser, 'preset of --weights (default: the space stored with them, else tiny)')
    parser.add_argument('--weights', required=True, help='the trained supernet to study')
    add_data_args(parser, batch_size=256)
    parser.add_argument('--parts', default=','.join(CHECK),
                        help=f'comma-separated parts to run, or all: {", ".join(PARTS)} (default: the check, '
                             f'{",".join(CHECK)})')
    parser.add_argument('--subnets', type=int, default=50, help='random subnets of the spread (default 50)')
    parser.add_argument('--test-images', type=int, default=None,
                        help='test top-1 on a fixed class-balanced subset of this many test images (default: all)')
    parser.add_argument('--finetune-subnets', type=int, default=8, help='subnets fine-tuned for the second tau')
    parser.add_argument('--finetune-epochs', type=int, default=None,
                        help="epochs of each fine-tune (default: finetune.py's recipe)")
    parser.add_argument('--retrain-epochs', type=int, default=None,
                        help="epochs of each retraining from scratch (default: scratch.py's recipe)")
    parser.add_argument('--max-params', type=float, default=None,
                        help='budget of the searches and the pick, M params (default: median of the random subnets)')
    parser.add_argument('--seeds', type=int, default=3, help='searches of each strategy, one per seed')
    parser.add_argument('--population', type=int, default=10, help='autoformer: population per generation')
    parser.add_argument('--generations', type=int, default=4,
                        help='autoformer: generations (random search gets population x generations candidates)')
    add_gpus_arg(parser, 'GPUs for the fine-tunes and retrainings (as scratch.py)')
    add_device_arg(parser, 'device of the evaluations')
    add_precision_args(parser)
    parser.add_argument('--quick', action='store_true',
                        help='a few minutes on a CPU: ' + ', '.join(f'--{key.replace("_", "-")} {value}'
                                                                    for key, value in QUICK.items())
                             + ' (flags given explicitly win)')
    parser.add_argument('--control-draws', type=int, default=5,
                        help='permutations of the negative control (seeds --seed, --seed + 1, ...; default 5)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random subnets and the first permutation')
    parser.add_argument('--output', default=None, metavar='FOLDER',
                        help='folder of the parts and report.md (default: outputs/study-<dataset>)')
    if '--quick' in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)
    args = parse_checked(parser, argv)
    parts = PARTS if args.parts == 'all' else tuple(p.strip() for p in args.parts.split(',') if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f'--parts {args.parts}: use all or some of {", ".join(PARTS)}')
    args.parts = parts
    args.dataset = folders.dataset_name(args.dataset, args.datapath)
    args.output = Path(args.output or f'outputs/study-{args.dataset}')
    return args


class Evaluator:
    """Inherited top-1 of subnets of one supernet on the search and test splits, each split decoded once into a
    cache in the output folder; per-image results kept for paired comparisons."""

    def __init__(self, supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                 args: argparse.Namespace) -> None:
        from devices import pick_device, set_up_precision
        self.supernet, self.space_kwargs, self.args = supernet, dict(space_kwargs), args
        self.device = pick_device(args.device)
        self.precision = set_up_precision(args.precision, args.tf32, self.device.type == 'cuda', 'evaluating')
        self.splits = {name: self._cache(name) for name in ('search', 'test')}

    def _cache(self, name: str) -> CachedSplit:
        import data
        import samplers
        import search_data
        path = self.args.output / f'{name}-data.pt'
        if not path.is_file():
            img_size, args = self.space_kwargs['img_size'], self.args
            if name == 'search' and search_data.search_source(args.dataset, args.datapath) == 'folder':
                raise UserError(f'--datapath {args.datapath} has no train/ folder: the study ranks on training images '
                                'held apart from the test (val/) images; give the dataset root holding train/ and val/')
            split = search_data.search_split(args.dataset, args.datapath, img_size) if name == 'search' else \
                data.build_dataset(args.dataset, args.datapath, 'test', img_size)
            if name == 'test' and args.test_images is not None and args.test_images < len(split):
                split = samplers.balanced_subset(split, args.test_images, seed=0)  # fixed and class-balanced
            classes = len(getattr(split, 'dataset', split).classes)
            data.check_classes(args.dataset, classes, self.space_kwargs, 'supernet')
            search_data.write_cache(split, args.dataset, path, num_workers=args.num_workers,
                                    desc=f'caching the {name} split')
        return search_data.CachedSplit(path)

    def correct(self, arch: Mapping[str, Any], splits: str | tuple[str, ...],
                subnet_weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Per-image top-1 hits of ``arch`` on a split (or on each of several, one model built): weights sliced
        from the supernet, or a subnet's own weights."""
        from engine import evaluate
        from space import AutoformerSpace, inherited_subnet
        if subnet_weights is None:
            model = inherited_subnet(self.supernet, arch, self.space_kwargs)
        else:
            model = AutoformerSpace(**self.space_kwargs).freeze(arch)
            model.load_state_dict(subnet_weights)
        hits = [evaluate(model, self.splits[split].batches(self.args.batch_size), self.device, progress=False,
                         precision=self.precision, per_image=True)['hits']
                for split in ((splits,) if isinstance(splits, str) else splits)]
        return hits[0] if isinstance(splits, str) else hits

    def record(self, arch: Mapping[str, Any], label: str) -> dict[str, Any]:
        search, test = self.correct(arch, ('search', 'test'))
        return {'label': label, 'arch': dict(arch), 'params': count_params(arch, **self.space_kwargs) / 1e6,
                'search_top1': 100 * search.float().mean().item(), 'test_top1': 100 * test.float().mean().item(),
                'search_images': len(search), 'test_images': len(test)}


def permuted(supernet: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor's entries shuffled: the trained supernet's weight statistics, none of what it learned."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor.flatten()[torch.randperm(tensor.numel(), generator=generator)].view_as(tensor)
            if tensor.is_floating_point() else tensor for name, tensor in supernet.items()}


def study_archs(space_kwargs: Mapping[str, Any], count: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """The smallest, the largest and up to ``count`` distinct random subnets (fewer when the space is smaller)."""
    archs = [('smallest', extreme_arch(space_kwargs, min)), ('largest', extreme_arch(space_kwargs, max))]
    seen = {arch_key(arch) for _, arch in archs}
    rng = random.Random(seed)
    for _ in range(100 * count):
        if len(archs) == count + 2:
            break
        arch = sample_arch(space_kwargs, rng)
        if arch_key(arch) not in seen:
            seen.add(arch_key(arch))
            archs.append(('random', arch))
    return archs


def spread(evaluator: Evaluator, args: argparse.Namespace) -> dict[str, Any]:
    """Inherited top-1 of the study's subnets on both splits, and the two ranking measures."""
    from tqdm import tqdm
    archs = study_archs(evaluator.space_kwargs, args.subnets, args.seed)
    records = [evaluator.record(arch, label) for label, arch in tqdm(archs, desc='subnets')]
    search, test = [r['search_top1'] for r in records], [r['test_top1'] for r in records]
    return {'records': records, 'tau_search_test': kendall(search, test),
            'tau_params_test': kendall([r['params'] for r in records], test)}


def control(supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any], args: argparse.Namespace,
            spread_part: Mapping[str, Any]) -> dict[str, Any]:
    """The same subnets on a supernet that learned nothing (its tensors permuted). Its search-split ranking
    against the trained supernet's test ranking is the study's measure with a broken predictor; against its
    own test ranking it shows what split agreement alone is worth. The subnets of one permuted supernet share
    its weights, so one permutation's tau is a single draw (the bootstrap over subnets misses that): the measure
    is the mean over ``--control-draws`` permutations, with its standard error."""
    from tqdm import tqdm
    evaluator = Evaluator(permuted(supernet, args.seed), space_kwargs, args)
    result = spread(evaluator, args)
    trained = {arch_key(r['arch']): r['test_top1'] for r in spread_part['records']}
    archs = [r['arch'] for r in result['records']]
    trained_test = [trained[arch_key(arch)] for arch in archs]
    result['tau_search_trained_test'] = kendall([r['search_top1'] for r in result['records']], trained_test)
    taus = [result['tau_search_trained_test']['tau']]
    for draw in range(1, args.control_draws):
        evaluator.supernet = permuted(supernet, args.seed + draw)  # the same splits and device: another draw
        search = [100 * evaluator.correct(arch, 'search').float().mean().item()
                  for arch in tqdm(archs, desc=f'permutation {draw + 1}/{args.control_draws}')]
        taus.append(kendall(search, trained_test, resamples=0)['tau'])
    defined = [tau for tau in taus if tau is not None]
    mean, se = mean_se(defined) if defined else (None, None)
    result['draws'] = {'taus': taus, 'mean': mean, 'se': se}
    return result


def run_script(command: list[str], log: list[str], done: bool = False) -> None:
    """Run one of the scripts as a user would (``done``: its result is already there; only logged)."""
    import shlex
    printable = 'python ' + shlex.join(command[1:])
    log.append(printable)
    if done:
        return
    print(f'$ {printable}', flush=True)
    # from the user's folder, where the relative paths of the study's own flags point
    if subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]]).returncode != 0:
        raise UserError(f'{printable} failed (its error is above); rerun the study to continue: parts and '
                        'runs already finished are kept')


def data_flags(args: argparse.Namespace) -> list[str]:
    flags = ['--dataset', args.dataset, '--num-workers', str(args.num_workers)]
    return flags + (['--datapath', str(args.datapath)] if args.datapath else [])


def train_subnet(script: str, arch: Mapping[str, Any], args: argparse.Namespace, epochs: int | None,
                 log: list[str]) -> Path:
    """``finetune.py --arch`` (inherited weights) or ``scratch.py --arch`` (from scratch): the subnet file,
    reused when an earlier run of the study wrote it, resumed from its checkpoint when one was interrupted."""
    kind = 'finetune' if script == 'finetune.py' else 'retrain'
    output = args.output / kind / f'{arch_key(arch)}-epochs-{epochs or "default"}'
    command = ['python', script, '--arch', json.dumps(arch), *data_flags(args), '--output', str(output),
               '--seed', str(args.seed)]
    command += ['--gpus', str(args.gpus)] if args.gpus is not None else []
    command += ['--weights', str(args.weights)] if script == 'finetune.py' else retrain_space_flags(args)
    if epochs:  # the recipe's warmup, shortened to leave the run at least one epoch after it
        recipe = (recipes.FINETUNE if script == 'finetune.py' else recipes.SCRATCH)[
            recipes.choose_recipe(args.dataset, args.datapath and str(args.datapath))[0]]
        command += ['--epochs', str(epochs), '--warmup', str(min(recipe['warmup'], epochs - 1))]
    folder = RunFolder(output)
    command += ['--resume'] if folder.interrupted('subnet') else []
    run_script(command, log, done=folder.weights('subnet').is_file())
    return folder.weights('subnet')


def retrain_space_flags(args: argparse.Namespace) -> list[str]:
    """What tells ``scratch.py`` the supernet's space: its preset and input size."""
    name = preset_name(args.space_kwargs)
    if name is None:
        raise UserError('retraining from scratch needs the supernet\'s space to be a preset (--name); this one is '
                        'not: leave pick out of --parts')
    return ['--name', name, '--img-size', str(args.space_kwargs['img_size'])]


def trained_top1(evaluator: Evaluator, arch: Mapping[str, Any], path: Path) -> torch.Tensor:
    from checkpoints import read_weights
    state_dict, _ = read_weights(path)
    return evaluator.correct(arch, 'test', state_dict)


def finetune(evaluator: Evaluator, args: argparse.Namespace, spread_part: Mapping[str, Any],
             control_part: Mapping[str, Any] | None) -> dict[str, Any]:
    """Inherited against fine-tuned test top-1 of random subnets spread over the inherited ranking (and the
    search-split ranking of the trained and of the permuted supernet against the fine-tuned one)."""
    ranked = sorted((r for r in spread_part['records'] if r['label'] == 'random'), key=lambda r: r['test_top1'])
    count = min(args.finetune_subnets, len(ranked))
    chosen = [ranked[round(i * (len(ranked) - 1) / max(count - 1, 1))] for i in range(count)]
    commands: list[str] = []
    records = []
    for record in chosen:
        path = train_subnet('finetune.py', record['arch'], args, args.finetune_epochs, commands)
        hits = trained_top1(evaluator, record['arch'], path)
        records.append({**record, 'finetuned_top1': 100 * hits.float().mean().item()})
    finetuned = [r['finetuned_top1'] for r in records]
    result = {'records': records, 'commands': commands,
              'tau_inherited_finetuned': kendall([r['test_top1'] for r in records], finetuned),
              'tau_search_finetuned': kendall([r['search_top1'] for r in records], finetuned)}
    if control_part is not None:  # the permuted supernet's search ranking of the same subnets
        broken = {arch_key(r['arch']): r['search_top1'] for r in control_part['records']}
        result['control_tau_search_finetuned'] = kendall([broken[arch_key(r['arch'])] for r in records], finetuned)
    return result


def run_search(strategy: str, seed: int, budget: float, args: argparse.Namespace, log: list[str]) -> Path:
    """One ``search.py`` run (one process, no web UI), resumed when an earlier study was interrupted in it."""
    output = args.output / 'searches' / f'{strategy}-seed{seed}-{budget:.4g}M-{args.population}x{args.generations}'
    command = ['python', 'search.py', '--weights', str(args.weights), *data_flags(args), '--engine', 'sequential',
               '--strategy', strategy, '--seed', str(seed), '--max-params', f'{budget:.6g}', '--output', str(output),
               '--batch-size', str(args.batch_size)]
    command += ['--device', args.device] if args.device else []
    if strategy == 'autoformer':
        half = max(args.population // 2, 1)
        command += ['--population', str(args.population), '--generations', str(args.generations),
                    '--select', str(max(args.population // 4, 2)), '--mutation-num', str(half),
                    '--crossover-num', str(half)]
    else:
        command += ['--trials', str(args.population * args.generations)]
    folder = SearchFolder(output)
    finished = folder.best.is_file() and 'interrupted' not in read_json(folder.best)
    if folder.experiment.is_file() and not finished:
        command += ['--resume']
    run_script(command, log, done=finished)
    return output


def evolution(evaluator: Evaluator, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """Autoformer's evolution against random search at equal candidates, ``--seeds`` searches each."""
    commands: list[str] = []
    runs = []
    for seed in range(args.seeds):
        for strategy in ('autoformer', 'random'):
            output = run_search(strategy, seed, budget, args, commands)
            candidates = sorted((read_json(path) for path in SearchFolder(output).records()),
                                key=lambda r: r['finished'])  # its candidate records in the order they finished
            best = read_json(SearchFolder(output).best)
            curve = [max(r['top1'] for r in candidates[:i + 1]) for i in range(len(candidates))]
            runs.append({'strategy': strategy, 'seed': seed, 'curve': curve, 'best_arch': best['arch'],
                         'best_search_top1': best['top1'], 'best_params': best['params'],
                         'best_test_top1': 100 * evaluator.correct(best['arch'], 'test').float().mean().item()})
    equal = min(len(run['curve']) for run in runs)
    summary = {}
    for strategy in ('autoformer', 'random'):
        mine = [run for run in runs if run['strategy'] == strategy]
        summary[strategy] = {'search_top1_at_equal': mean_se([run['curve'][equal - 1] for run in mine]),
                             'test_top1_of_pick': mean_se([run['best_test_top1'] for run in mine]),
                             'test_top1_range': (min(r['best_test_top1'] for r in mine),
                                                 max(r['best_test_top1'] for r in mine))}
    return {'budget': budget, 'candidates': equal, 'runs': runs, 'summary': summary, 'commands': commands}


def widest_within(space_kwargs: Mapping[str, Any], budget: float) -> dict[str, Any] | None:
    """What a person would pick by hand: the same layer everywhere, the widest embedding, then the widest
    MLP and the most heads, then the most layers, that fit ``budget`` (M params)."""
    choices = arch_choices(space_kwargs)
    for embed, ratio, heads, depth in itertools.product(*(sorted(choices[key], reverse=True) for key in
                                                          ('embed_dim', 'mlp_ratio_0', 'num_head_0', 'depth'))):
        arch = make_arch(embed, [ratio] * depth, [heads] * depth)
        if count_params(arch, **space_kwargs) / 1e6 <= budget:
            return arch
    return None


def pick(evaluator: Evaluator, args: argparse.Namespace, spread_part: Mapping[str, Any],
         evolution_part: Mapping[str, Any]) -> dict[str, Any]:
    """The searched subnet against the median random one and the widest uniform one at the same budget."""
    budget = evolution_part['budget']
    inside = sorted((r for r in spread_part['records'] if r['label'] == 'random' and r['params'] <= budget),
                    key=lambda r: r['test_top1'])
    if not inside:
        raise UserError(f'no random subnet of the spread is inside the budget {budget:g}M: raise --max-params')
    searched = next(run for run in evolution_part['runs'] if run['strategy'] == 'autoformer')['best_arch']
    contenders = {'searched': searched, 'median random': inside[len(inside) // 2]['arch'],
                  'widest uniform': widest_within(evaluator.space_kwargs, budget)}
    commands: list[str] = []
    rows, hits = [], {}
    for label, arch in contenders.items():
        if arch is None:
            continue
        hits[label] = {'inherited': evaluator.correct(arch, 'test'),
                       'fine-tuned': trained_top1(evaluator, arch, train_subnet('finetune.py', arch, args,
                                                                               args.finetune_epochs, commands)),
                       'retrained': trained_top1(evaluator, arch, train_subnet('scratch.py', arch, args,
                                                                              args.retrain_epochs, commands))}
        rows.append({'label': label, 'arch': arch, 'params': count_params(arch, **evaluator.space_kwargs) / 1e6,
                     **{kind: 100 * h.float().mean().item() for kind, h in hits[label].items()}})
    differences = {other: {kind: paired_difference(hits['searched'][kind], hits[other][kind])
                           for kind in hits['searched']} for other in hits if other != 'searched'}
    return {'budget': budget, 'rows': rows, 'searched_minus': differences,
            'in_budget_random_median_test_top1': statistics.median(r['test_top1'] for r in inside),
            'in_budget_random': len(inside), 'commands': commands}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from space import load_supernet_file
    supernet, space_kwargs, _ = load_supernet_file(args.weights, space_arg(args))
    args.space_kwargs = space_kwargs
    weights = Path(args.weights).resolve()
    fingerprint = {'weights': str(weights), 'weights_bytes': weights.stat().st_size,
                   'weights_mtime': weights.stat().st_mtime, 'dataset': args.dataset,
                   'datapath': str(Path(args.datapath).resolve()) if args.datapath else None,
                   'img_size': space_kwargs['img_size'], 'seed': args.seed, 'subnets': args.subnets,
                   'test_images': args.test_images}
    check_writable(args.output)
    with lock_output(args.output, 'a study'):
        # an output folder holds the study of one supernet on one data set: its caches and parts are reused
        recorded = read_json(args.output / 'study.json') if (args.output / 'study.json').is_file() else None
        if recorded is not None and recorded['fingerprint'] != fingerprint:
            changed = [key for key in fingerprint if recorded['fingerprint'].get(key) != fingerprint[key]]
            raise UserError(f'{args.output} holds the study of another supernet or data set (its '
                            f'{", ".join(changed)} differ): choose another --output')
        atomic_write_json({'fingerprint': fingerprint, 'dataset': args.dataset, 'weights': args.weights,
                           'argv': sys.argv[1:] if argv is None else argv}, args.output / 'study.json')
        run_parts(args, supernet, space_kwargs)
        plot(args.output)
        atomic_write_text(report(args.output), args.output / 'report.md')
    print(f'wrote {args.output / "report.md"}')
    return args.output / 'report.md'


def run_parts(args: argparse.Namespace, supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any]) -> None:
    """Each part of ``--parts``, and the parts they need that never ran; a part not asked for is read back."""
    evaluator = Evaluator(supernet, space_kwargs, args)
    results: dict[str, dict[str, Any]] = {}

    def budget() -> float:  # by default the median parameter count of the random subnets: half the space is inside
        if args.max_params is not None:
            return args.max_params
        return statistics.median(r['params'] for r in part('spread')['records'] if r['label'] == 'random')

    compute: dict[str, Callable[[], dict[str, Any]]] = {
        'spread': lambda: spread(evaluator, args),
        'control': lambda: control(supernet, space_kwargs, args, part('spread')),
        'finetune': lambda: finetune(evaluator, args, part('spread'), part('control')),
        'evolution': lambda: evolution(evaluator, args, budget()),
        'pick': lambda: pick(evaluator, args, part('spread'), part('evolution')),
    }

    def part(name: str) -> dict[str, Any]:
        path = args.output / f'{name}.json'
        if name not in results:
            if name in args.parts or not path.is_file():
                results[name] = compute[name]()
                atomic_write_json(results[name], path)
                print(summary_line(name, results[name]), flush=True)
            else:
                results[name] = read_json(path)
        return results[name]

    for name in args.parts:
        part(name)


if __name__ == '__main__':
    run_main(main)
