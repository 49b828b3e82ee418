"""What a search's numbers measure: the ranking metric, the split every figure names, ties, the
shuffled search split, the distinct-candidate count, refused strategy flags and the web-UI hint. Searches here
run on untrained supernets (what they rank does not matter, only what the files and lines say), in one process."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import torch

import search_data
import nni_patches
import experiment
import search
from cli import from_flags
from experiment import ExperimentSettings
from candidates import TIE_BREAK, metric_label, ranked
from checkpoints import save_weights
from conftest import free_port
from fixtures import IMBALANCED_SHARES, web_ui_trials, write_imbalanced_folder
from arch import arch_key, canonical_arch, complete_space_kwargs, count_params, extreme_arch
from space import AutoformerSpace, build_supernet
from strategy import AutoformerEvolution
from utils import UserError

SEQUENTIAL = ['--engine', 'sequential', '--num-workers', '0']


def untrained_supernet(path: Path, num_labels: int) -> Path:
    """The demo space's supernet, random weights, for ``num_labels`` classes at 32 px."""
    torch.manual_seed(0)
    space_kwargs = {**AutoformerSpace.preset('demo'), 'num_labels': num_labels}
    save_weights(path, build_supernet(space_kwargs).state_dict(), space_kwargs)
    return path


@pytest.fixture(scope='module')
def imbalanced(tmp_path_factory):
    """A 4-class imbalanced grayscale folder (train/ and val/) and an untrained supernet for it."""
    root = tmp_path_factory.mktemp('imbalanced')
    folder = write_imbalanced_folder(root / 'data', images=200, size=32)
    return folder, untrained_supernet(root / 'supernet.pth', len(IMBALANCED_SHARES))


def test_balanced_search_on_imbalanced_data_ranks_by_balanced_accuracy_and_names_the_split(imbalanced, tmp_path,
                                                                                           capsys):
    folder, weights = imbalanced
    output = tmp_path / 'search'
    args = ['--weights', str(weights), '--dataset', 'folder', '--datapath', str(folder), '--strategy', 'random',
            '--trials', '4', '--metric', 'balanced', *SEQUENTIAL, '--output', str(output)]
    best = search.main(args)
    out = capsys.readouterr().out
    records = json.loads((output / 'candidates.json').read_text())
    assert len(records) == best['candidates'] == 4
    for record in records:
        assert record['split'] == 'search' and list(record['per_class']) == sorted(IMBALANCED_SHARES)
        assert record['balanced'] == pytest.approx(sum(record['per_class'].values()) / 4)
        assert 'training images' in record['measured_on'] and 'not the validation split' in record['measured_on']
    assert records == ranked(records, 'balanced')  # best first, by the chosen metric
    assert best['ranked_by'] == 'balanced' and best['tie_break'] == TIE_BREAK
    assert best['balanced'] == max(r['balanced'] for r in records) and best['split'] == 'search'
    assert best['arch'] == records[0]['arch'] and canonical_arch(best['arch']) == best['nni_top_model']
    header = next(csv.reader((output / 'candidates.csv').open()))
    assert header[:2] == [metric_label('top1'), metric_label('balanced')] == \
        ['top-1 on the search split (%)', 'balanced accuracy on the search split (%)']
    # The search split: up to 100 training images per class (all 160 here: every class is smaller), shuffled.
    labels = search_data.CachedSplit(output / 'search-data.pt').labels
    assert torch.bincount(labels).tolist() == [13, 21, 86, 40]  # diagonal, disc, horizontal, vertical
    assert labels.tolist() != sorted(labels.tolist())
    assert ('ranked by balanced accuracy on the search split: training images, up to 100 per class (160 images, '
            '13 to 86 per class), which the supernet trained on; not the validation split') in out
    assert 'warning: the search split holds 160 images: a top-1 on it has a standard error of up to 4.0 points' in out
    # A resumed search must rank as it did: another --metric is another search.
    with pytest.raises(UserError, match=r"with another metric \('balanced', now 'top1'\)"):
        search.main([a for a in args if a not in ('--metric', 'balanced')] + ['--metric', 'top1', '--resume'])
    # Without --metric, a folder of imbalanced classes is ranked by balanced accuracy, said in one line.
    assert search.parse_args(args[:args.index('--metric')]).metric == 'balanced'
    assert 'imbalanced classes (the classes hold' in capsys.readouterr().out
    assert search.parse_args(['--dataset', 'digits']).metric == 'top1'


def test_cached_search_split_is_shuffled_once_with_a_fixed_seed(imbalanced, tmp_path):
    folder, _ = imbalanced
    split = search_data.search_split('folder', folder, 32, 52, seed=0)
    for name, seed in (('plain', None), ('shuffled', 0), ('again', 0)):
        search_data.write_cache(split, 'folder', tmp_path / f'{name}.pt', shuffle_seed=seed)
    plain, shuffled, again = (search_data.CachedSplit(tmp_path / f'{name}.pt')
                              for name in ('plain', 'shuffled', 'again'))
    assert plain.labels.tolist() == sorted(plain.labels.tolist())  # ImageFolder order: class by class
    assert torch.equal(shuffled.labels, again.labels) and torch.equal(shuffled.images, again.images)
    # The same (image, label) pairs, in another order.
    pairs = sorted((label, image.flatten().tolist()) for image, label in zip(plain.images, plain.labels.tolist()))
    assert pairs == sorted((label, image.flatten().tolist())
                           for image, label in zip(shuffled.images, shuffled.labels.tolist()))
    # In the shuffled order, the first batch holds about the split's class mix (a fair running top-1).
    assert len(set(shuffled.labels[:16].tolist())) >= 3


@pytest.fixture(scope='module')
def digits_weights(tmp_path_factory):
    return untrained_supernet(tmp_path_factory.mktemp('digits') / 'supernet.pth', 10)


def test_progress_counts_distinct_candidates_and_says_which_repeat(digits_weights, tmp_path, capsys):
    """Random proposals that differ only in layers past their depth are one candidate: 'candidate 12/12' and
    best.json's count agree."""
    best = search.main(['--weights', str(digits_weights), '--strategy', 'random', '--trials', '12',
                        '--max-params', '0.25', *SEQUENTIAL, '--output', str(tmp_path)])
    out = capsys.readouterr().out
    records = json.loads((tmp_path / 'candidates.json').read_text())
    assert 'candidate 12/12 ' in out and 'candidate 13/' not in out
    assert best['candidates'] == len(records) == len({arch_key(r['arch']) for r in records}) == 12
    assert 'a proposal repeats candidate ' in out and ': answered from its record, not counted' in out
    # digits' search split is its 180 validation images: the top-1's standard error, 3.7 points, is said once.
    assert out.count('standard error of up to 3.7 points') == 1
    assert 'digits validation split (180 images, 18 per class)' in records[0]['measured_on']


def test_a_resumed_search_answers_recorded_candidates_and_reevaluates_records_without_the_metric(
        digits_weights, tmp_path, capsys):
    args = ['--weights', str(digits_weights), '--strategy', 'random', '--trials', '3', *SEQUENTIAL,
            '--output', str(tmp_path)]
    search.main(args)
    paths = sorted((tmp_path / 'candidates').glob('*.json'))
    old = json.loads(paths[0].read_text())
    stripped = {k: v for k, v in old.items() if k not in ('balanced', 'per_class', 'split', 'measured_on')}
    paths[0].write_text(json.dumps(stripped))  # as an older version wrote it
    capsys.readouterr()
    search.main(args + ['--resume'])
    out = capsys.readouterr().out
    again = json.loads(paths[0].read_text())
    assert again['balanced'] == old['balanced'] and again['top1'] == old['top1']  # evaluated again, the same
    assert out.count('(from its record)') == 2 and 'candidate 3/3' in out
    # An older search (no metric in its fingerprint) whose records lack the metric: refused, not ranked as 0.
    experiment = json.loads((tmp_path / 'experiment.json').read_text())
    del experiment['fingerprint']['metric']
    (tmp_path / 'experiment.json').write_text(json.dumps(experiment))
    paths[1].write_text(json.dumps({k: v for k, v in json.loads(paths[1].read_text()).items() if k != 'balanced'}))
    with pytest.raises(UserError, match=r'1 candidate records in .* have no balanced'):
        search.main(args + ['--resume', '--metric', 'balanced'])


class TiedExperiment:
    """NNI's answer with a tie: another arch of the best's value."""

    def __init__(self, arch: dict) -> None:
        self.arch = arch

    def export_top_models(self, top_k: int, formatter: str) -> list[dict]:
        return [self.arch]


def test_ties_go_to_fewer_params_then_the_arch_key_and_nni_agrees_on_a_tie():
    space = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    small, large = extreme_arch(space, min), extreme_arch(space, max)
    records = [{'arch': large, 'top1': 50.0, 'balanced': 30.0, 'params': 2.0},
               {'arch': small, 'top1': 50.0, 'balanced': 25.0, 'params': 1.0},
               {'arch': dict(small, embed_dim=112), 'top1': 40.0, 'balanced': 30.0, 'params': 1.5}]
    assert ranked(records, 'top1')[0]['arch'] == small
    assert ranked(records, 'balanced')[0]['arch'] == dict(small, embed_dim=112)
    # NNI's top model with the best's value is the same answer, whichever of the tied archs NNI names.
    assert experiment.nni_top_model(TiedExperiment(large), records[1], records, 'top1') == canonical_arch(small)
    # The paper's evolution keeps its parents by the same rule.
    evolution = AutoformerEvolution(space, lambda arch: True)
    top = sorted([(50.0, large), (50.0, small), (60.0, dict(small, embed_dim=112))], key=evolution._rank)
    assert [arch for _, arch in top] == [dict(small, embed_dim=112), small, large]
    assert count_params(small, **space) < count_params(large, **space)


@pytest.mark.parametrize('flags, message', [
    (['--strategy', 'autoformer', '--trials', '20'],
     r'--trials \(--evolution-cycles\) counts the candidates of --strategy random and evolution; --strategy '
     r'autoformer evaluates --population x --generations \(50 x 20\): set those instead'),
    (['--strategy', 'autoformer', '--evolution-cycles', '20', '--population', '8'], r'\(8 x 20\)'),
    (['--population', '8'], '--population is a setting of --strategy autoformer, not of --strategy random'),
    (['--strategy', 'autoformer', '--evolution-sample-size', '3'],
     '--evolution-sample-size is a setting of --strategy evolution, not of --strategy autoformer'),
])
def test_a_flag_of_another_strategy_is_refused(flags, message):
    with pytest.raises(UserError, match=message):
        search.parse_args(['--weights', 'missing.pth', *flags])


def test_strategy_defaults_fill_in_when_not_given():
    args = search.parse_args(['--weights', 'missing.pth', '--strategy', 'autoformer'])
    assert (args.population, args.generations, args.planned) == (50, 20, 1000)
    assert search.parse_args(['--weights', 'missing.pth']).trials == 100


def test_the_web_ui_hint_is_the_loopback_command_to_copy():
    args = search.parse_args(['--weights', 'missing.pth', '--port', '8123', '--experiment-dir', '/tmp/nni exp'])
    hint = experiment.web_ui_hint('abc123', from_flags(ExperimentSettings, args))
    command = shlex.split(hint.split('with: ', 1)[1])
    assert command[0] == f"NODE_OPTIONS={nni_patches.loopback_node_options('')}"
    assert command[1:] == ['nnictl', 'view', 'abc123', '--port', '8123', '--experiment_dir', '/tmp/nni exp']
    assert 'this machine only' in hint
    everywhere = experiment.web_ui_hint('abc123', from_flags(
        ExperimentSettings, search.parse_args(['--weights', 'missing.pth', '--web-ui-host', 'all'])))
    assert 'NODE_OPTIONS' not in everywhere and 'every interface' in everywhere


@pytest.mark.slow
def test_web_ui_search_reports_the_chosen_metric_as_default(digits_weights, tmp_path, capsys):
    """NNI's default metric (what the web UI charts and ranks) is --metric, its intermediate results the running
    value of it; both accuracies are in the final dict under their own names."""
    port, experiments, output = free_port(), tmp_path / 'nni', tmp_path / 'search'
    best = search.main(['--weights', str(digits_weights), '--strategy', 'random', '--trials', '3', '--metric',
                        'balanced', '--engine', 'ts', '--num-workers', '0', '--port', str(port),
                        '--experiment-dir', str(experiments), '--output', str(output)])
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('web UI: '))
    assert f'NODE_OPTIONS={shlex.quote(nni_patches.loopback_node_options(""))} nnictl view' in hint
    records = {arch_key(r['arch']): r for r in json.loads((output / 'candidates.json').read_text())}
    assert best['ranked_by'] == 'balanced' and best['candidates'] == len(records) == 3
    assert all(r['measured_on'].startswith('the search split: the digits validation split') for r in records.values())
    trials = web_ui_trials(best['experiment_id'], experiments)
    assert len(trials) == 3  # one trial per distinct candidate
    balanced = {round(r['balanced'], 6) for r in records.values()}
    for final, intermediate in trials:
        assert final['default'] == final['balanced'] and round(final['default'], 6) in balanced
        assert {'top1', 'params', 'flops'} <= set(final)
        assert intermediate[-1] == pytest.approx(final['default'])
