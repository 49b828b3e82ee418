"""study.py's report: report.md and its figures, rebuilt from the parts' JSON files in the output folder, and
the one line each part prints when it finishes. Reads files only, so that a report can be rebuilt without the
supernet or the data."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping

from metrics import binomial_se, plus_minus
from plots import save_figure
from arch import arch_key
from utils import read_json

PARTS = ('spread', 'control', 'finetune', 'evolution', 'pick')


def format_tau(result: Mapping[str, Any] | None) -> str:
    if not result:
        return 'not run'
    if result['tau'] is None:
        return f'undefined: every subnet scored the same (n={result["n"]})'
    return (f'{result["tau"]:.3f} (95% bootstrap {result["low"]:.2f} to {result["high"]:.2f}, p={result["p"]:.2g}, '
            f'n={result["n"]})')


def control_tau(part: Mapping[str, Any]) -> str:
    """The control's measure: the mean tau over its permutations, each listed."""
    draws = part.get('draws')
    if not draws or draws['mean'] is None:
        return format_tau(part['tau_search_trained_test'])
    each = ', '.join('undefined' if tau is None else f'{tau:.2f}' for tau in draws['taus'])
    measure = 'mean ± standard error' if draws['se'] is not None else 'mean'
    return f'{plus_minus(draws["mean"], draws["se"], 3)} ({measure} over {len(draws["taus"])} permutations: {each})'


def spread_lines(part: Mapping[str, Any], title: str) -> list[str]:
    records = part['records']
    by_label = {r['label']: r for r in records if r['label'] != 'random'}
    randoms = [r['test_top1'] for r in records if r['label'] == 'random']
    images = records[0]['test_images']
    lines = [f'## {title}', '', f'{len(records)} subnets, inherited weights; test top-1 on {images} test images '
             f'(standard error about {binomial_se(statistics.fmean(randoms), images):.2f} points each), search '
             f'top-1 on the {records[0]["search_images"]} images of the search split.', '',
             '| subnet | params (M) | search top-1 (%) | test top-1 (%) |', '|---|---|---|---|']
    for label, record in by_label.items():
        lines.append(f'| {label} | {record["params"]:.3f} | {record["search_top1"]:.2f} | {record["test_top1"]:.2f} |')
    lines += [f'| {len(randoms)} random: min / median / max | | | {min(randoms):.2f} / '
              f'{statistics.median(randoms):.2f} / {max(randoms):.2f} |', '']
    if 'tau_search_trained_test' in part:  # the control
        return lines + [
            '- Kendall tau, its search top-1 against the trained supernet\'s test top-1 (the measure above with a '
            f'broken supernet; near zero when the ranking comes from what the supernet learned): '
            f'{control_tau(part)}; this permutation alone: {format_tau(part["tau_search_trained_test"])}',
            f'- Kendall tau, its search top-1 against its own test top-1: {format_tau(part["tau_search_test"])} '
            '(two splits agree on any fixed set of networks, meaningless ones too: agreement alone does not show '
            'that a supernet is good)', '']
    return lines + [f'- Kendall tau, search top-1 against test top-1: {format_tau(part["tau_search_test"])}',
                    f'- Kendall tau, parameter count against test top-1 (no supernet needed): '
                    f'{format_tau(part["tau_params_test"])}', '']


def report(output: Path) -> str:
    """report.md: every part present in ``output``, in the order of PARTS, and the commands they ran."""
    parts = {name: read_json(output / f'{name}.json') for name in PARTS if (output / f'{name}.json').is_file()}
    study = read_json(output / 'study.json')
    lines = [f'# Search study: {study["dataset"]}', '', f'Supernet `{study["weights"]}`; written by '
             f'`python study.py {" ".join(study["argv"])}`. Figures are as measured; each comes with its spread.', '']
    if 'spread' in parts:
        lines += spread_lines(parts['spread'], 'Spread and ranking (trained supernet)')
        lines += ['![test top-1 against parameters](spread.png)', '']
    if 'control' in parts:
        lines += spread_lines(parts['control'], 'Negative control: the same supernet, every tensor permuted')
    for name, section in (('finetune', finetune_lines), ('evolution', evolution_lines), ('pick', pick_lines)):
        lines += section(parts[name]) if name in parts else []
    commands = [c for part in parts.values() for c in part.get('commands', [])]
    if commands:
        lines += ['## Commands the study ran', '', '```', *commands, '```', '']
    return '\n'.join(lines)


def finetune_lines(part: Mapping[str, Any]) -> list[str]:
    lines = ['## Inherited against fine-tuned', '', '| params (M) | inherited test top-1 (%) | fine-tuned (%) |',
             '|---|---|---|']
    lines += [f'| {r["params"]:.3f} | {r["test_top1"]:.2f} | {r["finetuned_top1"]:.2f} |' for r in part['records']]
    lines += ['', f'- Kendall tau, inherited test top-1 against fine-tuned: '
              f'{format_tau(part["tau_inherited_finetuned"])}',
              f'- Kendall tau, search top-1 (what the search ranks by) against fine-tuned: '
              f'{format_tau(part.get("tau_search_finetuned"))}']
    if 'control_tau_search_finetuned' in part:
        lines.append(f'- the same for the permuted supernet (negative control): '
                     f'{format_tau(part["control_tau_search_finetuned"])}')
    return lines + ['']


def evolution_lines(part: Mapping[str, Any]) -> list[str]:
    lines = [f'## Evolution against random search ({part["budget"]:.3f}M params at most, {part["candidates"]} '
             f'candidates each, {len(part["runs"]) // 2} seeds)', '',
             '| strategy | best search top-1 at equal candidates (%) | test top-1 of its pick (%) | range over '
             'seeds |', '|---|---|---|---|']
    for strategy, row in part['summary'].items():
        (search, search_se), (test, test_se) = row['search_top1_at_equal'], row['test_top1_of_pick']
        lines.append(f'| {strategy} | {plus_minus(search, search_se)} | {plus_minus(test, test_se)} | '
                     f'{row["test_top1_range"][0]:.2f} to {row["test_top1_range"][1]:.2f} |')
    return lines + ['', '± is the standard error over seeds.', '', '![best so far](evolution.png)', '']


def pick_lines(part: Mapping[str, Any]) -> list[str]:
    lines = [f'## The pick against the alternatives ({part["budget"]:.3f}M params at most)', '',
             '| subnet | params (M) | inherited (%) | fine-tuned (%) | retrained (%) |', '|---|---|---|---|---|']
    lines += [f'| {r["label"]} | {r["params"]:.3f} | {r["inherited"]:.2f} | {r["fine-tuned"]:.2f} | '
              f'{r["retrained"]:.2f} |' for r in part['rows']]
    lines += ['', f'The median of the {part["in_budget_random"]} random subnets inside the budget: '
              f'{part["in_budget_random_median_test_top1"]:.2f}% inherited.']
    lines += [f'The {second["label"]} subnet is the {first["label"]} subnet here (one arch, two roles).'
              for i, first in enumerate(part['rows']) for second in part['rows'][i + 1:]
              if arch_key(first['arch']) == arch_key(second['arch'])]
    lines += ['', 'Searched minus each alternative, test top-1 points ± paired standard error (same test images):', '']
    for other, kinds in part['searched_minus'].items():
        lines.append(f'- {other}: ' + ', '.join(f'{kind} {diff:+.2f} ± {se:.2f}' for kind, (diff, se) in kinds.items()))
    return lines + ['']


def plot(output: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if (output / 'spread.json').is_file():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, marker in (('spread', 'o'), ('control', 'x')):
            if (output / f'{name}.json').is_file():
                records = read_json(output / f'{name}.json')['records']
                ax.scatter([r['params'] for r in records], [r['test_top1'] for r in records], marker=marker, s=16,
                           label='trained supernet' if name == 'spread' else 'permuted (control)')
        ax.set(xlabel='parameters (M)', ylabel='inherited test top-1 (%)')
        ax.legend()
        save_figure(fig, output / 'spread.png')
    if (output / 'evolution.json').is_file():
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in read_json(output / 'evolution.json')['runs']:
            ax.plot(range(1, len(run['curve']) + 1), run['curve'], color='C0' if run['strategy'] == 'autoformer'
                    else 'C1', alpha=0.8, label=f'{run["strategy"]}' if run['seed'] == 0 else None)
        ax.set(xlabel='candidates evaluated', ylabel='best search top-1 so far (%)')
        ax.legend()
        save_figure(fig, output / 'evolution.png')


def summary_line(name: str, result: Mapping[str, Any]) -> str:
    if name == 'spread':
        return f'spread: tau(search, test) {format_tau(result["tau_search_test"])}'
    if name == 'control':
        return f'control: tau(search, trained test) {control_tau(result)}'
    if name == 'finetune':
        return f'finetune: tau(inherited, fine-tuned) {format_tau(result["tau_inherited_finetuned"])}'
    if name == 'evolution':
        return 'evolution: pick test top-1 ' + ', '.join(
            f'{strategy} {plus_minus(*row["test_top1_of_pick"])}'
            for strategy, row in result['summary'].items())
    return 'pick: searched minus ' + ', '.join(f'{other} {kinds["inherited"][0]:+.2f} ± {kinds["inherited"][1]:.2f}'
                                              for other, kinds in result['searched_minus'].items())
