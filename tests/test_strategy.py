"""The paper's evolution operators (official evolution.py), and the search's choice of device."""
import argparse
import random

import pytest
import torch

import search
import strategy
from arch import arch_choices, arch_key, complete_space_kwargs, count_params
from space import AutoformerSpace

pytestmark = pytest.mark.fast  # make test-fast

SPACE = complete_space_kwargs(**AutoformerSpace.preset('tiny'))
CHOICES = arch_choices(SPACE)


def evolution(**kwargs) -> strategy.AutoformerEvolution:
    return strategy.AutoformerEvolution(SPACE, kwargs.pop('fits', lambda arch: True), **kwargs)


def arch_of_depth(depth: int, rng: random.Random, unused: dict | None = None) -> dict:
    arch = {label: rng.choice(values) for label, values in CHOICES.items()}
    arch['depth'] = depth
    for i in range(depth, max(SPACE['search_depth'])):
        arch.update(unused or {})
    return arch


def test_crossover_children_have_the_depth_of_both_parents():
    rng = random.Random(0)
    shallow, deep = min(SPACE['search_depth']), max(SPACE['search_depth'])
    parents = [arch_of_depth(shallow, rng)] + [arch_of_depth(deep, rng) for _ in range(3)]
    strategy = evolution(seed=1)
    strategy.top = [(0.0, p) for p in parents]
    children = [c for c in (strategy._crossover() for _ in range(500)) if c is not None]
    assert {child['depth'] for child in children} == {shallow, deep}  # children of both kinds of pair
    for child in children:
        same_depth = [p for p in parents if p['depth'] == child['depth']]
        # Every gene comes from a pair of parents of the child's depth (a cross of the shallow parent with a deep
        # one would give the shallow depth with a deep parent's genes in its layers).
        assert any(all(child[label] in (a[label], b[label]) for label in CHOICES)
                   for a in same_depth for b in same_depth)


def test_parents_of_different_depths_are_never_crossed():
    rng = random.Random(0)
    parents = [arch_of_depth(d, rng) for d in SPACE['search_depth'][:2]]
    strategy = evolution(seed=0)
    strategy.top = [(0.0, p) for p in parents]
    # Only a parent paired with itself has an equal depth: its child is that parent, gene for gene.
    children = [c for c in (strategy._crossover() for _ in range(200)) if c is not None]
    assert len(children) > 150
    assert all(child in parents for child in children)


def test_layers_added_by_a_depth_mutation_take_values_from_the_whole_choice_set():
    rng = random.Random(0)
    shallow = min(SPACE['search_depth'])
    fixed = {f'mlp_ratio_{i}': CHOICES['mlp_ratio_0'][0] for i in range(max(SPACE['search_depth']))}
    fixed.update({f'num_head_{i}': CHOICES['num_head_0'][0] for i in range(max(SPACE['search_depth']))})
    parent = {**arch_of_depth(shallow, rng), **{k: v for k, v in fixed.items() if int(k.rsplit('_', 1)[1]) >= shallow}}
    strategy = evolution(seed=2, param_mutation_prob=1.0, mutation_prob=0.0)
    added = {'mlp_ratio': set(), 'num_head': set()}
    for _ in range(300):
        child = strategy._mutate(parent)
        for i in range(shallow, child['depth']):
            for gene in added:
                added[gene].add(child[f'{gene}_{i}'])
        # With mutation_prob 0, the parent's own layers are untouched.
        assert all(child[f'{g}_{i}'] == parent[f'{g}_{i}'] for g in added for i in range(min(shallow, child['depth'])))
    assert added['mlp_ratio'] == set(SPACE['search_mlp_ratio'])
    assert added['num_head'] == set(SPACE['search_num_heads'])


def test_offspring_are_within_budget_never_seen_and_capped_at_ten_attempts_each():
    budget = strategy.Budget(SPACE, max_params=6.0)
    parents = evolution(seed=3, fits=budget.fits)
    parents.top = [(0.0, a) for a in parents._fill([])[:10]]
    seen_before = set(parents.seen)
    children = parents._make(25, lambda: parents._mutate(random.choice([a for _, a in parents.top])), 250)
    children += parents._make(25, parents._crossover, 250)
    keys = [arch_key(c) for c in children]
    assert children and len(set(keys)) == len(keys) and not set(keys) & seen_before
    assert all(count_params(c, **SPACE) / 1e6 <= 6.0 for c in children)

    proposals = []
    nothing_fits = evolution(seed=4, fits=lambda arch: False)
    nothing_fits._make(7, lambda: proposals.append(1) or nothing_fits._random(), 7 * strategy.OFFSPRING_ATTEMPTS)
    assert len(proposals) == 70


def namespace(**kwargs) -> argparse.Namespace:
    defaults = {'device': None, 'gpus': None, 'concurrency': None, 'engine': 'ts', 'machine_list': None,
                'precision': None, 'tf32': False}
    return argparse.Namespace(**{**defaults, **kwargs})


def test_cuda_is_the_default_device_when_present(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    args = namespace()
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency, devices.precision) == ('cuda', 1, 1, 'bf16-mixed')
    args = namespace(gpus=4)
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency) == ('cuda', 4, 4)
    args = namespace(device='cpu', concurrency=2)
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency) == ('cpu', 0, 2)
    assert capsys.readouterr().out == ''


def test_without_cuda_the_search_says_so_once_and_uses_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    args = namespace()
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency) == ('cpu', 0, 1)
    assert capsys.readouterr().out.strip().splitlines() == [
        'No CUDA GPU found: evaluating candidates on the CPU (slower).']
    args = namespace(device='cuda', gpus=2)
    devices = search.resolve_devices(args)
    assert devices.device == 'cpu' and devices.gpus == 0
    assert 'no CUDA GPU is visible' in capsys.readouterr().out


def test_with_machines_their_gpus_decide_the_device_and_the_trials_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # this machine only runs NNI's manager
    args = namespace(machine_list=[{'host': 'a', 'gpus': [0, 1, 2]}, {'host': 'b', 'gpus': [0]}])
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency) == ('cuda', 3, 4)
    args = namespace(machine_list=[{'host': 'a'}, {'host': 'b'}])
    devices = search.resolve_devices(args)
    assert (devices.device, devices.gpus, devices.concurrency) == ('cpu', 0, 2)
