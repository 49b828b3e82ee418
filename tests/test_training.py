import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import samplers
import finetune
import scratch
from conftest import GOLDEN
from fixtures import write_cifar10, write_image_folder
from lightning import AtomicCheckpointIO
from metrics import binomial_se
from checkpoints import read_weights, save_weights
from space import AutoformerSpace
from utils import UserError, lock_output

ROOT = Path(__file__).parent.parent
FAST = ['--dataset', 'digits', '--num-workers', '0', '--warmup', '0']


def above_chance(images: int | None = None, k: float = 4) -> float:
    """The top-1 (%) a digits model must beat to have learned: chance (10%) plus ``k`` binomial standard errors
    of ``images`` images (default: the validation split); k = 4: a model at chance passes about once in 30,000."""
    return 10 + k * binomial_se(10, images or len(data.build_dataset('digits', None, 'val', 32)))


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_scratch_digits_learns_and_writes_checkpoints_and_weights(tmp_path):
    scratch.main([*FAST, '--epochs', '6', '--warmup', '1', '--output', str(tmp_path)])
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['epochs'] == 6
    assert metrics['val_acc_min'] > above_chance() and metrics['val_acc_max'] > above_chance()  # both learned
    assert (tmp_path / 'checkpoints' / 'last.ckpt').is_file() and (tmp_path / 'checkpoints' / 'best.ckpt').is_file()
    supernet = AutoformerSpace.load_supernet_weights(None, tmp_path / 'supernet.pth')
    assert supernet['patch_embed.weight'].shape[0] == 128
    with pytest.raises(UserError, match='already holds a training run'):
        scratch.main([*FAST, '--epochs', '4', '--output', str(tmp_path)])


@pytest.mark.full  # the DDP path of the next test; test_data.py checks the sampler without repeated augmentation
def test_ddp_without_repeated_augmentation_splits_the_images_and_ends_with_identical_weights(tmp_path):
    """Under DDP with --no-repeated-aug each rank reads 629 of the 1257 digits an epoch (with it, 512: see the
    next test)."""
    result = run_script('scratch.py', *FAST, '--cpu-processes', '2', '--epochs', '1', '--output', str(tmp_path),
                        '--no-repeated-aug', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'DDP: all 2 ranks hold identical supernet weights' in result.stdout
    assert 'repeated augmentation' not in result.stdout
    checkpoint = torch.load(tmp_path / 'checkpoints' / 'last.ckpt', weights_only=True)
    assert checkpoint['global_step'] == 629 // 32
    assert (tmp_path / 'supernet.pth').is_file()


def read_trace(output: Path) -> dict[tuple[int, int], dict]:
    """The AUTOFORMER_TRACE records of a run's ranks by (rank, step); a step traced again by a resumed run keeps
    its last record."""
    records = {}
    for path in sorted((output / 'trace').glob('rank-*.jsonl')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[record['rank'], record['step']] = record
    return records


@pytest.mark.slow
def test_ddp_ranks_share_each_steps_arch_draw_their_own_mixup_and_resume_exactly(tmp_path):
    """Every rank trains the step's arch, with its own Mixup/CutMix draws (seed + rank, as the
    official run); a run extended by --resume draws and trains exactly what an uninterrupted one does (a constant
    learning rate, so that the first epoch does not depend on --epochs)."""
    args = ['scratch.py', *FAST, '--cpu-processes', '2', '--batch-size', '128', '--mixup', '0.8', '--cutmix', '1.0',
            '--drop-path', '0.1', '--learning-rate', '1e-3', '--min-lr', '1e-3', '--warmup', '0']
    env = {**os.environ, 'AUTOFORMER_TRACE': '1'}
    for output, epochs in ((tmp_path / 'whole', ['--epochs', '2']), (tmp_path / 'resumed', ['--epochs', '1']),
                           (tmp_path / 'resumed', ['--epochs', '2', '--resume'])):
        result = run_script(*args, *epochs, '--output', str(output), timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        # the official repeated augmentation: 1024 = 4 x 256 images an epoch, each 3 times across the ranks
        assert 'repeated augmentation: 1024 images an epoch across 2 processes, each 3 times' in result.stdout
        assert 'DDP: all 2 ranks hold identical supernet weights' in result.stdout
    whole, resumed = read_trace(tmp_path / 'whole'), read_trace(tmp_path / 'resumed')
    steps = sorted(step for rank, step in whole if rank == 0)
    assert steps == list(range(8)) and len(whole) == 16  # 2 epochs of 512 images a rank, batch 128
    assert all(whole[0, step]['arch'] == whole[1, step]['arch'] for step in steps)
    assert sum(whole[0, step]['lam'] != whole[1, step]['lam'] for step in steps) >= 6  # rarely equal (both 1.0)
    assert len({json.dumps(whole[0, step]['arch']) for step in steps}) > 1  # the arch changes from step to step
    assert resumed == whole  # arch, lambda, learning rate and loss of every step on both ranks
    weights, reference = (read_weights(tmp_path / run / 'supernet.pth')[0] for run in ('resumed', 'whole'))
    assert all(torch.equal(weights[key], reference[key]) for key in reference)


@pytest.mark.slow
def test_killed_mid_checkpoint_write_then_mid_epoch_resumes_to_the_planned_epochs(tmp_path):
    """Killed halfway through writing epoch 1's checkpoint, the run keeps epoch 0's; resumed and killed again
    in the middle of epoch 2, it keeps epoch 1's; resumed again, it finishes the planned epochs, every epoch
    validated in one of the runs' logs."""
    args = ['scratch.py', *FAST, '--epochs', '3', '--output', str(tmp_path)]
    checkpoints = tmp_path / 'checkpoints'
    last = checkpoints / 'last.ckpt'
    killed = run_script('tests/die_mid_write.py', r'last\.ckpt', '2', *args, timeout=600)  # half of epoch 1's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(checkpoints.glob('.last.ckpt.*.tmp')), 'the kill did not land in the write'
    assert torch.load(last, map_location='cpu', weights_only=False)['epoch'] == 0

    trace = tmp_path / 'trace' / 'rank-0.jsonl'  # a line a training step, with its epoch
    process = subprocess.Popen([sys.executable, *args, '--resume'], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, 'AUTOFORMER_TRACE': '1'})
    deadline = time.time() + 300
    while not (trace.is_file() and '"epoch": 2' in trace.read_text()) and time.time() < deadline \
            and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, 'the run ended before it could be killed'
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert torch.load(last, map_location='cpu', weights_only=False)['epoch'] == 1  # whole, not half-written
    assert not (tmp_path / 'supernet.pth').exists()

    result = run_script(*args, '--resume', timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'metrics.json').read_text())['epochs'] == 3
    assert torch.load(last, map_location='cpu', weights_only=False)['epoch'] == 2
    assert not list(checkpoints.glob('.*.tmp'))  # the killed write's leftover is cleared on resume
    epochs = set()
    for log in sorted((tmp_path / 'logs').glob('version_*/metrics.csv')):  # the killed runs' logs are kept
        with open(log) as f:
            epochs.update(row['epoch'] for row in csv.DictReader(f) if row.get('val_acc_max'))
    assert epochs == {'0', '1', '2'}


def test_last_checkpoint_is_every_epochs_and_best_only_a_better_ones(tmp_path):
    """last.ckpt, what --resume continues, follows every epoch, also one whose validation is no better (Lightning
    2.6's save_last skips those); with a zero learning rate no epoch is better than the first."""
    scratch.main([*FAST, '--epochs', '2', '--learning-rate', '0', '--warmup-lr', '0', '--min-lr', '0', '--output',
                  str(tmp_path)])

    def epoch(name):
        return torch.load(tmp_path / 'checkpoints' / name, map_location='cpu', weights_only=False)['epoch']
    assert epoch('last.ckpt') == 1 and epoch('best.ckpt') == 0


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match='no checkpoint'):
        scratch.main([*FAST, '--resume', '--output', str(tmp_path)])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, golden):
    """The golden official weights as a supernet file (32 px, patch 4, 10 classes)."""
    space_kwargs = golden[0]
    path = tmp_path_factory.mktemp('pretrained') / 'supernet.pth'
    save_weights(path, AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth'), space_kwargs)
    return path


def test_finetune_loads_all_but_the_head_and_trains_on_cifar10(tmp_path, pretrained):
    write_cifar10(tmp_path / 'cifar', n_train_per_batch=13, n_test=20)
    output = tmp_path / 'run'
    # With a zero learning rate, everything loaded comes out unchanged: what differs was not loaded.
    finetune.main(['--weights', str(pretrained), '--datapath', str(tmp_path / 'cifar'), '--epochs', '1',
                   '--warmup', '0', '--learning-rate', '0', '--warmup-lr', '0', '--min-lr', '0', '--batch-size', '16',
                   '--num-workers', '0', '--output', str(output)])
    before, _ = read_weights(pretrained)
    after, meta = read_weights(output / 'supernet.pth')
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ['head.bias', 'head.weight']
    assert meta['space']['img_size'] == 32


def test_finetune_at_another_input_size_resamples_the_position_embedding(tmp_path, pretrained):
    write_cifar10(tmp_path / 'cifar', n_train_per_batch=13, n_test=20)
    output = tmp_path / 'run'
    finetune.main(['--weights', str(pretrained), '--datapath', str(tmp_path / 'cifar'), '--epochs', '1',
                   '--warmup', '0', '--img-size', '16', '--batch-size', '16', '--num-workers', '0', '--output',
                   str(output)])
    after, meta = read_weights(output / 'supernet.pth')
    assert meta['space']['img_size'] == 16 and meta['space']['rpe_length'] == 8
    assert after['pos_embed.pos_embed'].shape == (1, 17, 128)


def test_two_training_runs_into_one_output_are_refused_and_a_resume_must_match(tmp_path):
    """The second of two runs into one --output is refused naming the first; a --resume with
    another dataset than the run had is refused before the checkpoint is touched."""
    with lock_output(tmp_path, 'a training run'):
        with pytest.raises(UserError, match=r'is in use by a training run \(pid \d+ on '):
            scratch.main([*FAST, '--epochs', '1', '--output', str(tmp_path)])
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'last.ckpt').write_bytes(b'the run so far')
    (tmp_path / 'run.json').write_text(json.dumps({'dataset': 'digits', 'datapath': None}))
    write_image_folder(tmp_path / 'other', ['a', 'b'], 2)
    with pytest.raises(UserError, match=r"--resume: .* holds a training run with another dataset "
                                        r"\('digits', now 'folder'\)"):
        scratch.main(['--dataset', 'folder', '--datapath', str(tmp_path / 'other'), '--name', 'demo',
                      '--resume', '--output', str(tmp_path)])
    assert (tmp_path / 'checkpoints' / 'last.ckpt').read_bytes() == b'the run so far'


def test_a_checkpoint_holding_nan_is_never_written(tmp_path):
    """A diverged run stops with one line; the last good checkpoint stays."""
    last = tmp_path / 'last.ckpt'
    last.write_bytes(b'the last good checkpoint')
    diverged = {'epoch': 3, 'state_dict': {'_model.head.weight': torch.tensor([1.0, float('nan')])}}
    with pytest.raises(UserError, match=r'training diverged at epoch 3 \(last.ckpt not written.*holds NaN'):
        AtomicCheckpointIO().save_checkpoint(diverged, last)
    assert last.read_bytes() == b'the last good checkpoint'


def test_training_replaces_undecodable_images_and_counts_them(tmp_path):
    """Undecodable images in training: batches keep their size, and metrics.json says how many were replaced."""
    root = tmp_path / 'data'
    for split in ('train', 'val'):
        write_image_folder(root / split, ['a', 'b'], 6, size=32)
        for name in ('a', 'b'):
            (root / split / name / 'garbage.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    scratch.main(['--dataset', 'folder', '--datapath', str(root), '--name', 'demo', '--epochs', '1', '--warmup', '0',
                  '--batch-size', '4', '--num-workers', '0', '--output', str(tmp_path / 'run')])
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert metrics['undecodable_images'] == 2 and metrics['undecodable_val_images'] == 2


def test_validation_classes_that_differ_from_training_are_refused(tmp_path):
    """A class missing from val/ would shift every validation label: refused before training."""
    write_image_folder(tmp_path / 'data' / 'train', ['a', 'b', 'c'], 4, size=32)
    write_image_folder(tmp_path / 'data' / 'val', ['a', 'c'], 2, size=32)
    with pytest.raises(UserError, match='validation classes of folder differ from its training classes'):
        scratch.main(['--dataset', 'folder', '--datapath', str(tmp_path / 'data'), '--name', 'demo', '--epochs', '1',
                      '--warmup', '0', '--batch-size', '4', '--num-workers', '0', '--output', str(tmp_path / 'run')])
    assert not (tmp_path / 'run' / 'supernet.pth').exists()


def test_ema_decay_writes_an_averaged_supernet(tmp_path):
    """--ema-decay keeps an exponential moving average of the weights: written beside the supernet, a
    different file of the same space, which validation reports on."""
    scratch.main([*FAST, '--epochs', '1', '--ema-decay', '0.9', '--output', str(tmp_path)])
    weights, meta = read_weights(tmp_path / 'supernet.pth')
    averaged, ema_meta = read_weights(tmp_path / 'supernet-ema.pth')
    assert ema_meta['space'] == meta['space'] and averaged.keys() == weights.keys()
    assert any(not torch.equal(weights[k], averaged[k]) for k in weights)
    # One epoch: the averaged weights validated above chance by two binomial standard errors (a model at chance
    # passes 1 time in 44); the four-error margin of learning is the other tests' (more epochs).
    assert json.loads((tmp_path / 'metrics.json').read_text())['val_acc_max'] > above_chance(k=2)


def official_decayed_names(official: dict[str, torch.Tensor]) -> set[str]:
    """timm 0.3.2's ``add_weight_decay`` as the official run calls it, on the official parameter names:
    1-D tensors, ``.bias`` and the exact names of ``no_weight_decay()`` are not decayed."""
    skip = {'pos_embed', 'cls_token', 'rel_pos_embed'}
    return {name for name, tensor in official.items()
            if not (tensor.ndim == 1 or name.endswith('.bias') or name in skip)}


@pytest.mark.parametrize('rel_pos_decay', [True, False])
def test_weight_decay_groups_are_those_of_the_official_run(golden, rel_pos_decay):
    from checkpoints import to_project_layout
    from lightning import SupernetModule
    from arch import complete_space_kwargs
    from space import build_supernet
    official = torch.load(GOLDEN / 'small-official.pth', weights_only=True)['model']
    expected = set(to_project_layout({name: official[name] for name in official_decayed_names(official)}, 'official'))
    space_kwargs = complete_space_kwargs(**golden[0])
    module = SupernetModule(space_kwargs, rel_pos_decay=rel_pos_decay, mixup=0, cutmix=0)
    supernet = build_supernet(space_kwargs)
    module.set_model(supernet)
    names = {id(param): name for name, param in supernet.named_parameters()}
    groups = module.configure_optimizers()['optimizer'].param_groups
    decayed = {names[id(p)] for group in groups if group['weight_decay'] > 0 for p in group['params']}
    assert set(names.values()) == set(to_project_layout(official, 'official'))  # every tensor is in a group
    tables = {name for name in expected if 'rel_pos_embed' in name}
    assert len(tables) == 16 and 'cls_token.cls_token' not in decayed and 'pos_embed.pos_embed' not in decayed
    assert decayed == (expected if rel_pos_decay else expected - tables)
    assert {group['weight_decay'] for group in groups} == {0.05, 0.0}


def test_finetune_arch_trains_the_searched_subnet_from_its_inherited_weights(tmp_path, digits_supernet):
    import evaluate
    from arch import canonical_arch, make_arch
    arch = make_arch(112, [3.5, 4.0, 3.0], [2, 1, 2])
    best = tmp_path / 'best.json'
    best.write_text(json.dumps({'arch': arch, 'top1': 0.0}))  # as search.py writes it
    test = ['--dataset', 'digits', '--split', 'test', '--num-workers', '0']
    inherited = evaluate.main(['--weights', str(digits_supernet), '--arch', str(best), *test])
    output = tmp_path / 'subnet'
    finetune.main(['--weights', str(digits_supernet), '--arch', str(best), *FAST, '--output', str(output)])
    state, meta = read_weights(output / 'subnet.pth')
    assert meta['arch'] == canonical_arch(arch) and meta['space']['search_embed_dim'] == [96, 112, 128]
    tuned = evaluate.main(['--weights', str(output / 'subnet.pth'), *test])  # the file alone: arch and space in it
    assert tuned['arch'] == canonical_arch(arch) and tuned['params'] == inherited['params']
    # Fine-tuning loses no more than two binomial standard errors of the inherited top-1 on these test images.
    assert tuned['top1'] >= inherited['top1'] - 2 * binomial_se(inherited['top1'], inherited['images'])
    assert json.loads((output / 'metrics.json').read_text())['val_acc_subnet'] > above_chance()
    with pytest.raises(UserError, match='already holds a training run'):
        finetune.main(['--weights', str(digits_supernet), '--arch', str(best), *FAST, '--output', str(output)])


def test_scratch_arch_retrains_one_subnet_and_resumes_it(tmp_path):
    import evaluate
    from arch import make_arch
    arch = json.dumps(make_arch(96, [3.0, 3.0], [1, 1]))
    args = [*FAST, '--arch', arch, '--warmup', '0', '--output', str(tmp_path)]
    scratch.main([*args, '--epochs', '1'])
    first = read_weights(tmp_path / 'subnet.pth')[0]
    assert all(not key.startswith('blocks.blocks.') for key in first) and 'blocks.1.fc1.weight' in first
    (tmp_path / 'subnet.pth').unlink()
    scratch.main([*args, '--epochs', '2', '--resume'])
    assert json.loads((tmp_path / 'metrics.json').read_text())['epochs'] == 2
    results = evaluate.main(['--weights', str(tmp_path / 'subnet.pth'), '--dataset', 'digits', '--num-workers', '0',
                             '--output', str(tmp_path / 'evaluated'), '--export'])
    assert results['arch'] == json.loads(arch) and results['top1'] > above_chance(results['images'])
    export = tmp_path / 'evaluated' / 'export'
    scripted = torch.jit.load(export / 'subnet.torchscript.pt')
    assert scripted(torch.zeros(1, 3, 32, 32)).shape == (1, 10) and (export / 'subnet.onnx').is_file()
    with pytest.raises(UserError, match='holds a training run with another arch'):
        scratch.main([*FAST, '--arch', json.dumps(make_arch(96, [3.0, 3.5], [1, 1])), '--warmup', '0', '--epochs', '3',
                      '--output', str(tmp_path), '--resume'])


@pytest.mark.slow
def test_compile_of_a_fixed_arch_keeps_outputs_and_state_dict_keys():
    """``--compile`` compiles the subnet in place (``nn.Module.compile``): same outputs, same weights file keys."""
    from arch import make_arch
    space_kwargs = AutoformerSpace.preset('demo')
    model = AutoformerSpace(**space_kwargs).freeze(make_arch(96, [3.0, 3.5], [1, 2])).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = model(images)
        keys = list(model.state_dict())
        model.compile()
        compiled = model(images)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5) and list(model.state_dict()) == keys


def train_one_step(module, optimizer, arch, images, targets):
    """One optimizer step as Lightning's automatic optimization takes it, with the module's hooks."""
    from space import set_active_arch
    set_active_arch(module.model, arch)
    torch.nn.functional.cross_entropy(module.model(images), targets).backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    module.optimizer_zero_grad(0, 0, optimizer)


@pytest.mark.fast
@pytest.mark.parametrize('skip', [False, True])
def test_unsampled_layers_are_decayed_and_moved_as_in_the_official_run_unless_skipped(skip):
    """A layer used in one step and not in the next keeps a zero gradient (torch 1.7's zero_grad, the
    official run's), so AdamW decays it and moves it by momentum; --skip-unsampled leaves it alone."""
    from lightning import SupernetModule
    from arch import complete_space_kwargs, extreme_arch
    from space import build_supernet
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    module = SupernetModule(space_kwargs, learning_rate=1e-3, warmup_epochs=0, epochs=1, mixup=0, cutmix=0,
                            skip_unsampled=skip)
    torch.manual_seed(0)
    module.set_model(build_supernet(space_kwargs))
    optimizer = module.configure_optimizers()['optimizer']
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    deepest = module.model.blocks.blocks[-1].fc1.weight
    train_one_step(module, optimizer, extreme_arch(space_kwargs, max), images, targets)  # uses the deepest block
    before = deepest.detach().clone()
    train_one_step(module, optimizer, extreme_arch(space_kwargs, min), images, targets)  # does not
    assert torch.equal(deepest, before) == skip
    assert (deepest.grad is None) == skip


@pytest.mark.parametrize('skip', [False, True], ids=['official', 'skip-unsampled'])
def test_a_layer_unused_after_a_validation_is_still_decayed_and_moved_unless_skipped(tmp_path, monkeypatch, skip):
    """Two epochs of Lightning with a validation between them: the first trains the largest arch, the second the
    smallest, so the deepest layer is used only in the first. Lightning sets every gradient to None before a
    validation (``on_validation_model_zero_grad``): without ``restore_zero_grads`` AdamW would skip that layer for
    the whole second epoch. The official run decays it and moves it by momentum; --skip-unsampled leaves it."""
    import pytorch_lightning as pl

    import lightning
    from arch import complete_space_kwargs, extreme_arch
    from space import build_supernet
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    trainer_ref = []
    monkeypatch.setattr(lightning, 'sample_arch', lambda space, rng: extreme_arch(
        space, max if trainer_ref[0].current_epoch == 0 else min))
    train = data.build_dataset('digits', None, 'train', 32, training=True)
    val = data.build_dataset('digits', None, 'val', 32)
    module = lightning.SupernetModule(space_kwargs, learning_rate=1e-3, warmup_epochs=0, epochs=2, steps_per_epoch=3,
                                      mixup=0, cutmix=0, skip_unsampled=skip, schedule='step')
    deepest = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # after the first epoch's validation
            if trainer.current_epoch == 1:
                deepest['before'] = pl_module.model.blocks.blocks[-1].fc1.weight.detach().clone()

    trainer = pl.Trainer(accelerator='cpu', devices=1, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[Snapshot()], default_root_dir=tmp_path)
    trainer_ref.append(trainer)
    module.set_model(build_supernet(space_kwargs))
    trainer.fit(module, samplers.build_loader(train, 32, 0, drop_last=True), samplers.build_loader(val, 32, 0))
    after = module.model.blocks.blocks[-1].fc1.weight.detach()
    assert trainer.global_step == 6 and 'before' in deepest
    assert torch.equal(after, deepest['before']) == skip


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_in_training_stops_cleanly_with_the_command_that_continues(tmp_path, sig):
    """SIGTERM or SIGINT to the whole process group (loader workers included) mid-run: one line, no traceback, the
    exit status a shell gives that signal, and the printed command continues the run to its end."""
    output = tmp_path / 'run'
    log = tmp_path / 'stderr.txt'
    with open(log, 'w') as err:
        process = subprocess.Popen([sys.executable, 'scratch.py', '--dataset', 'digits', '--epochs', '6', '--warmup',
                                    '0', '--num-workers', '2', '--output', str(output)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (output / 'checkpoints' / 'last.ckpt').exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, sig)
        status = process.wait(timeout=120)
    text = log.read_text()
    assert status == 128 + sig and 'Traceback' not in text, text[-3000:]
    command = text.split('Continue with: ')[1].split()
    assert command[0] == 'python' and command[-1] == '--resume'
    subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert json.loads((output / 'metrics.json').read_text())['epochs'] == 6


def test_a_step_non_finite_on_one_ddp_rank_is_skipped_on_every_rank(tmp_path):
    """Rank 1's loss is non-finite at one step. Were that rank alone to skip it, rank 0 would wait in its gradient
    reduction (a hang) or, without one, count a step more and train another arch from then on. Every rank skips it:
    the same step count, the same archs, the same weights."""
    from conftest import free_port
    env = {**os.environ, 'AUTOFORMER_TRACE': '1', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(free_port()), str(ROOT / 'tests' / 'ddp_nonfinite.py'), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f'rank-{rank}.json').read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and (ranks[0]['step'], ranks[0]['skipped']) == (5, 1)
    archs = [[json.loads(line)['arch'] for line in (tmp_path / 'trace' / f'rank-{rank}.jsonl').read_text().splitlines()]
             for rank in (0, 1)]
    assert archs[0] == archs[1] and len(archs[0]) == 4  # the skipped step is traced on neither
    assert 'non-finite loss' in done.stderr


@pytest.mark.fast
@pytest.mark.parametrize('epochs, warmup', [(300, 5), (12, 3), (4, 0)])
def test_the_epoch_schedule_is_the_official_runs_timm_cosine(epochs, warmup):
    """--schedule epoch gives every step of an epoch the learning rate the official run trains that
    epoch at: timm's CosineLRScheduler as timm 0.3.2's create_scheduler builds it for --sched cosine, stepped with
    step(epoch) after each epoch as supernet_train.py does."""
    from timm.scheduler import CosineLRScheduler
    from lightning import SupernetModule
    from arch import complete_space_kwargs
    from space import build_supernet
    lr, warmup_lr, min_lr, steps_per_epoch = 1e-3, 1e-6, 1e-5, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    official = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=min_lr, cycle_mul=1.0, cycle_decay=0.1,
                                 warmup_lr_init=warmup_lr, warmup_t=warmup, cycle_limit=1, t_in_epochs=True)
    expected = []
    for epoch in range(epochs):
        expected += [optimizer.param_groups[0]['lr']] * steps_per_epoch
        official.step(epoch)
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    module = SupernetModule(space_kwargs, learning_rate=lr, min_lr=min_lr, warmup_lr=warmup_lr, epochs=epochs,
                            warmup_epochs=warmup, steps_per_epoch=steps_per_epoch, mixup=0, cutmix=0)
    module.set_model(build_supernet(space_kwargs))
    configured = module.configure_optimizers()
    ours = []
    for _ in range(epochs * steps_per_epoch):  # as Lightning steps it: after every optimizer step
        ours.append(configured['optimizer'].param_groups[0]['lr'])
        configured['optimizer'].step()  # no gradients: nothing moves
        configured['lr_scheduler']['scheduler'].step()
    assert configured['lr_scheduler']['interval'] == 'step'
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.fast
def test_scratch_arch_defaults_to_the_official_retrain_recipe(capsys, tmp_path):
    """Retraining one subnet defaults to 300 epochs with 5 of warmup (the official --mode retrain),
    the supernet to the paper's 500 and 20; the small datasets keep their own recipe; --help says which."""
    imagenet = ['--dataset', 'imagenet', '--datapath', str(tmp_path)]  # parsed, never read
    supernet, retrain = scratch.parse_args(imagenet), scratch.parse_args([*imagenet, '--arch', 'autoformer-tiny'])
    assert (supernet.epochs, supernet.warmup, retrain.epochs, retrain.warmup) == (500, 20, 300, 5)
    assert retrain.schedule == supernet.schedule == 'epoch'
    digits = scratch.parse_args(['--dataset', 'digits', '--arch', 'autoformer-tiny'])
    assert (digits.epochs, digits.warmup, digits.schedule) == (40, 2, 'step')
    assert scratch.parse_args([*imagenet, '--arch', 'autoformer-tiny', '--epochs', '7']).epochs == 7
    with pytest.raises(SystemExit):
        scratch.parse_args([*imagenet, '--arch', 'autoformer-tiny', '--help'])
    assert 'training epochs (default: 300)' in ' '.join(capsys.readouterr().out.split())
