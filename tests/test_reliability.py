"""Faults, bad input and untrusted files: one clear error, nothing lost."""
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import lightning
import scratch
import search
from checkpoints import load_checked, save_weights, torch_load
from cli import from_flags, load_json_arg
from conftest import GOLDEN
from fixtures import within
from arch import SpaceError, canonical_arch, check_arch, complete_space_kwargs, count_params
from space import AutoformerSpace, build_supernet
from utils import UserError

ROOT = Path(__file__).parent.parent


def test_atomic_save_survives_sigkill_at_any_moment(tmp_path):
    target = tmp_path / 'weights.pth'
    writer = ("import sys, torch; sys.path.insert(0, '.'); from checkpoints import atomic_torch_save\n"
              "i = 0\n"
              "while True:\n"
              "    i += 1\n"
              f"    atomic_torch_save({{'i': i, 'x': torch.full((1_000_000,), float(i))}}, {str(target)!r})\n")
    rng = random.Random(0)
    for _ in range(5):
        process = subprocess.Popen([sys.executable, '-c', writer], cwd=ROOT)
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = torch_load(target)  # never half-written
        assert torch.all(saved['x'] == saved['i'])
    assert not [p for p in tmp_path.iterdir() if p.name != 'weights.pth' and not p.name.startswith('.weights')]


def test_full_disk_stops_with_one_message_and_keeps_the_old_file(tmp_path, golden):
    target = tmp_path / 'supernet.pth'
    space_kwargs = golden[0]
    state = AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth')
    save_weights(target, state, space_kwargs)
    before = target.read_bytes()
    code = ("import resource, signal, sys; sys.path.insert(0, '.')\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a disk that fills at 200 kB\n"
            "from checkpoints import read_weights, save_weights\nfrom cli import run_main\n"
            f"state, meta = read_weights({str(target)!r})\n"
            f"run_main(lambda: save_weights({str(target)!r}, state, meta['space']))\n")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'error: cannot write {target}: File too large']
    assert target.read_bytes() == before


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def as_read_only(folder: Path, command: list[str]) -> list[str]:
    """``command`` seeing ``folder`` read-only: a read-only bind mount for root (which ignores modes)."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob('*')]:
            if path.is_dir():
                path.chmod(0o555)
        return command
    if shutil.which('unshare') and subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode == 0:
        remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
        return ['unshare', '-m', 'sh', '-c', remount, str(folder), *command]
    pytest.skip('root without mount namespaces: no way to make a folder read-only here')


@pytest.mark.slow
def test_read_only_output_is_refused_up_front_and_earlier_results_kept(tmp_path):
    run = tmp_path / 'run'
    scratch.main(['--dataset', 'digits', '--epochs', '1', '--warmup', '0', '--output', str(run)])
    before = snapshot(run)
    for script in (['scratch.py', '--dataset', 'digits', '--epochs', '2', '--warmup', '0', '--resume', '--output',
                    str(run)],
                   ['search.py', '--weights', str(run / 'supernet.pth'), '--engine', 'sequential',
                    '--output', str(run / 'search')]):
        result = subprocess.run(as_read_only(run, [sys.executable, *script]), cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert 'Traceback' not in result.stderr
        folder = run / 'search' if script[0] == 'search.py' else run
        last_line = result.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf'error: --output {re.escape(str(folder))} cannot be written '
                            r'\((Read-only file system|Permission denied)\): .*', last_line)
    assert snapshot(run) == before


def test_full_disk_during_training_stops_with_one_message_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / 'run'
    scratch.main(['--dataset', 'digits', '--epochs', '1', '--warmup', '0', '--output', str(run)])
    before = snapshot(run / 'checkpoints')

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))  # logs fit, a checkpoint does not
    result = subprocess.run([sys.executable, 'scratch.py', '--dataset', 'digits', '--epochs', '2', '--warmup', '0',
                             '--resume', '--output', str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert re.fullmatch(rf'error: cannot write {re.escape(str(run / "checkpoints"))}/(best|last)\.ckpt: '
                        'File too large', result.stderr.strip().splitlines()[-1])
    assert snapshot(run / 'checkpoints') == before


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, golden):
    space_kwargs = golden[0]
    state = AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth')
    state['blocks.blocks.1.fc1.weight'][3, 4] = float('nan')
    save_weights(tmp_path / 'nan.pth', state, space_kwargs)
    with pytest.raises(UserError, match=r'blocks.blocks.1.fc1.weight holds NaN or Inf'):
        AutoformerSpace.load_supernet_weights(None, tmp_path / 'nan.pth')


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('norm.weight'), 'tensor norm.weight is missing'),
    (lambda sd: sd.update(extra=torch.zeros(1)), 'unexpected tensor extra'),
    (lambda sd: sd.update({'head.bias': torch.zeros(3)}), r'head.bias has shape \(3,\) but the model needs \(10,\)'),
])
def test_subnet_state_dict_mismatches_are_named(golden, change, message):
    space_kwargs, _, cases = golden
    model = AutoformerSpace(**space_kwargs).freeze(cases[0]['arch'])
    state = model.state_dict()
    change(state)
    with pytest.raises(UserError, match=message):
        load_checked(model, state, 'subnet.pth')


def test_gpus_without_a_gpu_fall_back_to_the_cpu_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    run = from_flags(engine.TrainingRun, scratch.parse_args(['--dataset', 'digits', '--gpus', '4']), output='x')
    with caplog.at_level(logging.WARNING):
        settings, processes = engine.trainer_settings(run)
    assert settings['accelerator'] == 'cpu' and processes == 1 and settings['precision'] == '32-true'
    assert 'no CUDA GPU is visible: training on the CPU' in caplog.text


@pytest.mark.parametrize('cuda, bf16, expected', [(True, True, 'bf16-mixed'), (True, False, '16-mixed'),
                                                  (False, True, '32-true')])
def test_precision_defaults_to_mixed_on_cuda_and_fp32_on_the_cpu(monkeypatch, cuda, bf16, expected):
    from devices import set_up_precision
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: bf16)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    assert set_up_precision(None, False, cuda, 'training') == expected
    assert set_up_precision('32-true', False, cuda, 'training') == '32-true'
    assert torch.backends.cudnn.benchmark == cuda  # fixed input sizes: cuDNN picks its fastest kernels once


def test_fp16_on_the_cpu_is_refused_and_bf16_runs_cpu_autocast(caplog):
    from devices import set_up_precision
    with pytest.raises(UserError, match='--precision 16-mixed needs CUDA'):
        set_up_precision('16-mixed', False, False, 'training')
    with caplog.at_level(logging.WARNING):
        assert set_up_precision('bf16-mixed', False, False, 'training') == 'bf16-mixed'
    assert 'usually slower there than fp32' in caplog.text


def test_non_finite_loss_skips_the_step_naming_step_and_arch(golden, caplog):
    space_kwargs = golden[0]
    module = lightning.SupernetModule(complete_space_kwargs(**space_kwargs), mixup=0, cutmix=0)
    module.set_model(build_supernet(space_kwargs))
    images = torch.full((2, 3, 32, 32), float('nan'))
    with caplog.at_level(logging.ERROR):
        assert module.training_step((images, torch.tensor([1, 2])), 0) is None
    assert 'non-finite loss' in caplog.text and 'at step 0 for arch' in caplog.text and 'embed_dim' in caplog.text


def test_same_seed_gives_the_same_supernet_weights(tmp_path):
    for run in ('a', 'b'):
        scratch.main(['--dataset', 'digits', '--epochs', '1', '--warmup', '0', '--seed', '3', '--output',
                      str(tmp_path / run)])
    first, second = (torch.load(tmp_path / run / 'supernet.pth', weights_only=True)['state_dict'] for run in 'ab')
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_same_seed_gives_the_same_sequential_search(tmp_path, digits_supernet):
    for run in ('a', 'b'):
        search.main(['--weights', str(digits_supernet), '--strategy', 'autoformer',
                     '--generations', '2', '--population', '6', '--select', '3', '--mutation-num', '3',
                     '--crossover-num', '3', '--engine', 'sequential', '--seed', '5', '--output', str(tmp_path / run)])
    first, second = ([(r['arch'], r['top1']) for r in json.loads((tmp_path / run / 'candidates.json').read_text())]
                     for run in 'ab')
    assert first == second


def corruptions(data: bytes, rng: random.Random):
    """Byte flips, truncations, insertions and garbage, as disks and downloads produce them."""
    kind = rng.choice(['flip', 'truncate', 'insert', 'garbage', 'zero-run'])
    data = bytearray(data)
    if kind == 'flip':
        for _ in range(rng.randint(1, 50)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 'truncate':
        data = data[:rng.randrange(len(data))]
    elif kind == 'insert':
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
    elif kind == 'garbage':
        data = bytearray(rng.randbytes(rng.randint(0, 5000)))
    else:
        at = rng.randrange(len(data))
        data[at:at + rng.randint(1, 5000)] = bytes(5000)
    return bytes(data)


def test_fuzzed_checkpoints_give_only_clear_errors(tmp_path, golden):
    space_kwargs = golden[0]
    valid = (GOLDEN / 'small-official.pth').read_bytes()
    rng = random.Random(1)
    shapes = {k: v.shape for k, v in build_supernet(space_kwargs).state_dict().items()}
    outcomes = {'loaded': 0, 'refused': 0}
    for i in range(200):
        path = tmp_path / 'fuzzed.pth'
        path.write_bytes(corruptions(valid, rng))
        try:
            loaded = within(30, lambda: AutoformerSpace.load_supernet_weights(space_kwargs, path))
        except (UserError, SpaceError):
            outcomes['refused'] += 1
            continue
        # what loads is usable weights: every tensor of the space, of its shape, floating point and finite
        assert {k: v.shape for k, v in loaded.items()} == shapes, i
        assert all(v.is_floating_point() and torch.isfinite(v).all() for v in loaded.values()), i
        outcomes['loaded'] += 1
    assert outcomes['refused'] > 0 and sum(outcomes.values()) == 200, outcomes


def arch_corruptions(arch: dict, rng: random.Random) -> str:
    arch = dict(arch)
    kind = rng.choice(['drop', 'value', 'type', 'text', 'extra', 'nest'])
    label = rng.choice(sorted(arch))
    if kind == 'drop':
        del arch[label]
    elif kind == 'value':
        arch[label] = rng.choice([0, -1, 7, 10**9, 3.3, 1e308, 2.5])
    elif kind == 'type':
        arch[label] = rng.choice(['96', None, True, [96], {'v': 1}, 'NaN'])
    elif kind == 'extra':
        arch['mystery'] = 1
    elif kind == 'nest':
        return json.dumps([arch])
    text = json.dumps(arch)
    if kind == 'text':
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(['', '}', ',', '"', '{{']) + text[cut + 1:]
    return text


def test_fuzzed_arch_json_gives_only_clear_errors(golden):
    space_kwargs, _, cases = golden
    rng = random.Random(2)
    refused = 0
    for i in range(200):
        text = arch_corruptions(cases[i % len(cases)]['arch'], rng)
        try:
            arch = load_json_arg(text)
            params = within(10, lambda: count_params(arch, **space_kwargs))
        except (UserError, SpaceError):
            refused += 1
            continue
        check_arch(arch, complete_space_kwargs(**space_kwargs))  # an accepted arch is of the space, counted exactly
        assert params == count_params(canonical_arch(arch), **space_kwargs) > 0, text
    assert refused > 0


def test_loopback_preload_keeps_a_node_server_on_127_0_0_1(tmp_path):
    node = Path(sys.executable).parent.parent / 'lib' / f'python{sys.version_info.major}.{sys.version_info.minor}' \
        / 'site-packages' / 'nni_node' / 'node'
    script = ("const s = require('http').createServer().listen(0, () => "
              "{ console.log(s.address().address); s.close(); });")
    result = subprocess.run([str(node), '--require', str(ROOT / 'loopback.js'), '-e', script],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == '127.0.0.1'
    # without NODE_OPTIONS: a web-UI search run in this process (search.main) sets it to the preload
    clean = {key: value for key, value in os.environ.items() if key != 'NODE_OPTIONS'}
    plain = subprocess.run([str(node), '-e', script], capture_output=True, text=True, timeout=60, env=clean)
    assert plain.stdout.strip() in ('::', '0.0.0.0')  # what NNI's server does without it
