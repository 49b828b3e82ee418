"""Every script once on tiny inputs, in the order a user runs them (make test-fast): train a digits supernet for an
epoch, evaluate a subnet of it, search it, fine-tune the searched subnet, convert an official checkpoint, study the
supernet. Each step checks what the next one relies on; the full behaviour is tested in the other modules."""
from __future__ import annotations

import json

import pytest
import torch

import convert
import evaluate
import finetune
import scratch
import search
import study
from checkpoints import read_weights
from fixtures import official_tiny_checkpoint
from arch import canonical_arch, count_params, make_arch

pytestmark = pytest.mark.fast

ARCH = make_arch(96, [3.0, 4.0], [1, 2])
DIGITS = ['--dataset', 'digits', '--num-workers', '0']


@pytest.fixture(scope='module')
def one_epoch_supernet(tmp_path_factory):
    output = tmp_path_factory.mktemp('smoke-supernet')
    scratch.main([*DIGITS, '--epochs', '1', '--warmup', '0', '--output', str(output)])
    return output / 'supernet.pth'


def test_scratch_writes_a_supernet_with_its_space(one_epoch_supernet):
    state_dict, meta = read_weights(one_epoch_supernet)
    assert meta['space']['search_embed_dim'] == [96, 112, 128] and meta['space']['num_labels'] == 10
    assert all(torch.isfinite(tensor).all() for tensor in state_dict.values())


def test_evaluate_slices_a_subnet(one_epoch_supernet, tmp_path):
    results = evaluate.main(['--weights', str(one_epoch_supernet), '--arch', json.dumps(ARCH), *DIGITS,
                             '--output', str(tmp_path)])
    written = json.loads((tmp_path / 'results.json').read_text())
    assert written['top1'] == results['top1'] and 0 <= results['top1'] <= 100
    assert written['params'] == count_params(ARCH, **read_weights(one_epoch_supernet)[1]['space'])


def test_search_then_finetune_its_pick(one_epoch_supernet, tmp_path):
    best = search.main(['--weights', str(one_epoch_supernet), *DIGITS, '--engine', 'sequential', '--strategy',
                        'random', '--trials', '3', '--output', str(tmp_path / 'search')])
    assert len(json.loads((tmp_path / 'search' / 'candidates.json').read_text())) <= 3
    finetune.main(['--weights', str(one_epoch_supernet), '--arch', str(tmp_path / 'search' / 'best.json'), *DIGITS,
                   '--epochs', '1', '--warmup', '0', '--output', str(tmp_path / 'finetune')])
    _, meta = read_weights(tmp_path / 'finetune' / 'subnet.pth')
    assert meta['arch'] == canonical_arch(best['arch'])


def test_convert_an_official_checkpoint(tmp_path):
    torch.save(official_tiny_checkpoint(torch.Generator().manual_seed(0)), tmp_path / 'official.pth')
    convert.main(['--name', 'tiny', '--input', str(tmp_path / 'official.pth'), '--output', str(tmp_path / 's.pth')])
    assert read_weights(tmp_path / 's.pth')[1]['space']['search_embed_dim'] == [192, 216, 240]


def test_study_checks_a_supernet(one_epoch_supernet, tmp_path):
    report = study.main(['--weights', str(one_epoch_supernet), *DIGITS, '--subnets', '4', '--control-draws', '1',
                         '--output', str(tmp_path)])
    assert 'Negative control' in report.read_text() and json.loads((tmp_path / 'spread.json').read_text())['records']
