"""study.py: on a briefly trained Fashion-MNIST supernet the search split ranks subnets like the test set, and
on the same supernet with its tensors permuted (the negative control) it does not; the evolution part runs
search.py at equal candidates."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

import data
import scratch
import study
import torch
from metrics import binomial_se, kendall, paired_difference
from arch import complete_space_kwargs, count_params, extreme_arch
from space import AutoformerSpace, build_supernet
from utils import UserError

installed = pytest.mark.skipif(not data.FASHION_SYSTEM_PATH.is_dir(),
                               reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")


@pytest.fixture(scope='module')
def fashion_supernet(tmp_path_factory):
    output = tmp_path_factory.mktemp('fashion-supernet')
    scratch.main(['--dataset', 'fashion-mnist', '--epochs', '1', '--warmup', '0', '--num-workers', '0', '--output',
                  str(output)])
    return output / 'supernet.pth'


@pytest.fixture(scope='module')
def quick_study(fashion_supernet, tmp_path_factory):
    """Run from the supernet's folder with relative paths, as a user types them: the searches it starts must
    find the weights and write into the study's folder."""
    output = tmp_path_factory.mktemp('study')
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(fashion_supernet.parent)
        study.main(['--weights', fashion_supernet.name, '--dataset', 'fashion-mnist', '--quick', '--num-workers', '0',
                    '--parts', 'spread,control,evolution', '--seeds', '1', '--output', os.path.relpath(output)])
    return output


def kendall_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between two independent rankings of ``n`` items (no ties):
    sqrt(2 (2n + 5) / (9 n (n - 1))), the spread of a tau that measures nothing."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def read(output, part):
    return json.loads((output / f'{part}.json').read_text())


@pytest.mark.slow
@installed
def test_search_split_ranks_a_trained_supernet_like_the_test_set(quick_study):
    tau = read(quick_study, 'spread')['tau_search_test']
    # Kendall's test against independent rankings: a positive tau at p < 0.01 (two-sided).
    assert tau['n'] == 14 and tau['tau'] > 0 and tau['p'] < 0.01


@pytest.mark.slow
@installed
def test_negative_control_ranks_nothing(quick_study):
    """The permuted supernet: the same measure must not find a ranking (else the study could never fail)."""
    part = read(quick_study, 'control')
    spread = read(quick_study, 'spread')
    # Nothing learned survives: the best permuted subnet is below the worst trained one by 4 binomial standard errors.
    worst, images = min(r['test_top1'] for r in spread['records']), spread['records'][0]['test_images']
    assert max(r['test_top1'] for r in part['records']) < worst - 4 * binomial_se(worst, images)
    assert len(part['draws']['taus']) == 3  # --quick's permutations
    # Within 3 null standard deviations of one Kendall tau over n subnets (a bound on the mean of the draws however
    # they correlate: a mean's spread is at most one draw's), and below the trained tau's bootstrap 95% interval.
    mean = part['draws']['mean']
    assert abs(mean) < 3 * kendall_null_sd(part['tau_search_trained_test']['n'])
    assert mean < spread['tau_search_test']['low']


@pytest.mark.slow
@installed
def test_evolution_against_random_at_equal_candidates(quick_study):
    part = read(quick_study, 'evolution')
    assert sorted((run['strategy'], run['seed']) for run in part['runs']) == [('autoformer', 0), ('random', 0)]
    assert part['candidates'] == 8
    for run in part['runs']:
        assert run['curve'] == sorted(run['curve']) and run['best_params'] <= part['budget'] + 1e-9
        assert run['best_search_top1'] == run['curve'][-1]
    report = (quick_study / 'report.md').read_text()
    assert '## Evolution against random search' in report and 'Negative control' in report
    assert '(one run: no standard error)' in report and '± 0.00 |' not in report  # one seed: no spread measured
    assert (quick_study / 'spread.png').is_file() and (quick_study / 'evolution.png').is_file()


@pytest.mark.slow
@installed
def test_another_supernet_in_the_same_output_is_refused(quick_study, fashion_supernet, tmp_path):
    other = tmp_path / 'supernet.pth'
    shutil.copy(fashion_supernet, other)
    with pytest.raises(UserError, match='holds the study of another supernet or data set .its weights'):
        study.main(['--weights', str(other), '--dataset', 'fashion-mnist', '--output', str(quick_study)])


def test_kendall_measures_agreement_and_says_when_there_is_no_ranking():
    same = kendall([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60])
    reversed_ = kendall([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    assert same['tau'] == pytest.approx(1) and same['p'] < 0.01 and reversed_['tau'] == pytest.approx(-1)
    assert kendall([1, 2, 3], [7, 7, 7])['tau'] is None


def test_kendall_null_bound_holds_for_noise_and_not_for_a_ranking():
    """The control's bound: tau of shuffled rankings spreads by kendall_null_sd (within 10% over 2,000 draws)
    and stays inside 3 of them but for a normal tail's share (under 1%); a real ranking lies far outside."""
    import random
    import statistics
    rng, ranks = random.Random(0), list(range(14))
    taus = [kendall(ranks, rng.sample(ranks, 14), resamples=0)['tau'] for _ in range(2000)]
    assert statistics.pstdev(taus) == pytest.approx(kendall_null_sd(14), rel=0.1)
    assert sum(abs(tau) >= 3 * kendall_null_sd(14) for tau in taus) < 0.01 * len(taus)
    assert kendall(ranks, ranks, resamples=0)['tau'] > 3 * kendall_null_sd(14)


def test_paired_difference_of_two_models_on_the_same_images():
    first, second = torch.tensor([1, 1, 1, 0] * 25).bool(), torch.tensor([1, 0, 1, 0] * 25).bool()
    difference, se = paired_difference(first, second)
    # 25 of 100 paired differences are 1, the rest 0: the binomial standard error with the sample variance's n - 1.
    assert difference == pytest.approx(25.0) and se == pytest.approx(binomial_se(25.0, 100) * (100 / 99) ** 0.5)


def test_permuted_supernet_keeps_each_tensors_values_not_their_order():
    space = complete_space_kwargs(**AutoformerSpace.preset('fashion'))
    state = build_supernet(space).state_dict()
    shuffled = study.permuted(state, seed=0)
    name = 'patch_embed.weight'
    assert torch.equal(shuffled[name].flatten().sort().values, state[name].flatten().sort().values)
    assert not torch.equal(shuffled[name], state[name]) and shuffled[name].shape == state[name].shape


def test_widest_uniform_subnet_fits_the_budget():
    space = complete_space_kwargs(**AutoformerSpace.preset('fashion'))
    budget = count_params(extreme_arch(space, max), **space) / 2e6
    arch = study.widest_within(space, budget)
    assert count_params(arch, **space) / 1e6 <= budget and arch['embed_dim'] == 128
    assert len({arch[f'mlp_ratio_{i}'] for i in range(arch['depth'])}) == 1
    assert study.widest_within(space, count_params(extreme_arch(space, min), **space) / 2e6) is None
