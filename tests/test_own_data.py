"""A researcher's own data set, followed through the README with no flags beyond --dataset folder --datapath
(and a short --epochs): an imbalanced folder of small grayscale images (tests/fixtures.py)."""
from __future__ import annotations

import json

import pytest
import torch
from timm.data.auto_augment import RandAugment

import data
import folders
import image_folder
import recipes
import samplers
import evaluate
import finetune
import scratch
from fixtures import IMBALANCED_SHARES, write_image_folder, write_imbalanced_folder
from utils import UserError


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_imbalanced_folder(tmp_path_factory.mktemp('own-data'), images=500, size=40)


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """scratch.py as a new user runs it (a short run: the recipe's warmup of 3 leaves 7 epochs)."""
    output = tmp_path_factory.mktemp('own-supernet')
    scratch.main(['--dataset', 'folder', '--datapath', str(folder), '--epochs', '10', '--num-workers', '0',
                  '--output', str(output)])
    return output


def test_a_small_folder_gets_the_small_recipe_and_a_space_of_its_size(folder, capsys):
    args = scratch.parse_args(['--dataset', 'folder', '--datapath', str(folder)])
    printed = capsys.readouterr().out
    assert args.recipe == 'small' and args.name == 'demo' and args.epochs == 50 and args.mixup == 0
    assert 'recipe small (400 training images of about 40 px' in printed and 'the demo preset' in printed
    with pytest.raises(SystemExit):
        scratch.parse_args(['--dataset', 'folder', '--datapath', str(folder), '--help'])
    assert 'small: epochs 50, warmup 3, base_lr 0.008' in capsys.readouterr().out
    assert scratch.parse_args(['--dataset', 'folder', '--datapath', str(folder), '--recipe', 'imagenet']).epochs == 500


def test_both_training_scripts_scale_the_learning_rate_by_one_rule(folder):
    for script in (scratch, finetune):
        args = script.parse_args(['--dataset', 'folder', '--datapath', str(folder), '--batch-size', '32'])
        assert args.learning_rate is None and args.base_lr > 0  # engine.peak_learning_rate: base_lr x batch / 512
        given = script.parse_args(['--dataset', 'folder', '--datapath', str(folder), '--learning-rate', '0.01'])
        assert given.learning_rate == 0.01


def test_a_warmup_as_long_as_the_run_is_refused(folder):
    with pytest.raises(UserError, match='--warmup 3 is as long as the run or longer'):
        scratch.parse_args(['--dataset', 'folder', '--datapath', str(folder), '--epochs', '3'])


def test_grayscale_images_get_no_colour_augmentation(folder, tmp_path):
    def augments_colour(root) -> bool:
        folders.profile_folder.cache_clear()
        transform = data.build_dataset('folder', str(root), 'train', 128, training=True).transform  # > SMALL_IMAGE
        return any(isinstance(step, RandAugment) for step in transform.transforms)

    assert not augments_colour(folder)
    assert augments_colour(write_image_folder(tmp_path / 'rgb' / 'train', ['a', 'b'], 3, size=40).parent)


def test_balanced_sampling_draws_each_class_equally_often(folder):
    train = data.build_dataset('folder', str(folder), 'train', 32, training=True)
    labels = torch.tensor(samplers.labels_of(train))
    for balanced in (True, False):
        drawn = labels[list(samplers.RankSampler(train, shuffle=True, balanced=balanced, seed=1))]
        shares = torch.bincount(drawn, minlength=4).double() / len(drawn)
        # 400 draws: a share's binomial standard error is at most 2.5 points; allow 4 of them
        expected = torch.full((4,), 0.25) if balanced else torch.bincount(labels).double() / len(labels)
        assert (shares - expected).abs().max() < 4 * 0.025, (balanced, shares)
    assert max(IMBALANCED_SHARES.values()) > 0.25 + 2 * 4 * 0.025  # so that the two arms differ


def test_training_learns_beyond_the_largest_class_and_reports_balanced_accuracy(trained, folder, tmp_path, capsys):
    metrics = json.loads((trained / 'metrics.json').read_text())
    # A majority-class predictor scores 25% balanced. The 100 validation images hold 54, 25, 13 and 8 of the
    # classes: the balanced accuracy's standard error is at most 6.4 points, so 45 is 3 of them above 25.
    assert metrics['val_balanced_max'] > 45, metrics
    assert (trained / 'supernet-best.pth').is_file() and metrics['best']['epoch'] < 10
    results = evaluate.main(['--weights', str(trained / 'supernet.pth'), '--arch', 'largest', '--dataset', 'folder',
                             '--datapath', str(folder), '--num-workers', '0', '--output', str(tmp_path)])
    printed = capsys.readouterr().out
    assert results['split'] == 'val' and 'has no test split of its own here; evaluating on val' in printed
    assert results['top5'] is None and 'top-5' not in printed.splitlines()[-2]
    assert set(results['classes']) == set(IMBALANCED_SHARES) and len(results['per_class']) == 4
    assert results['balanced'] == pytest.approx(sum(results['per_class']) / 4)
    assert 'per-class top-1: diagonal' in printed and (tmp_path / 'confusion.png').is_file()
    assert json.loads((tmp_path / 'results.json').read_text())['confusion'] == results['confusion']


def test_export_without_data_names_the_classes_and_the_preprocessing(trained, tmp_path):
    evaluate.main(['--weights', str(trained / 'supernet.pth'), '--arch', 'smallest', '--output', str(tmp_path),
                   '--export'])
    info = json.loads((tmp_path / 'export' / 'subnet.json').read_text())
    assert info['classes'] == sorted(IMBALANCED_SHARES)
    assert info['preprocessing']['mean'] == pytest.approx(list(image_folder.IMAGENET_MEAN))
    assert info['preprocessing']['input_size'] == 32 and info['preprocessing']['resize'] == 32
    assert not (tmp_path / 'results.json').exists()  # nothing evaluated


def test_finetune_validates_before_its_first_epoch_and_keeps_the_best_epoch(trained, folder, tmp_path, capsys):
    finetune.main(['--weights', str(trained / 'supernet.pth'), '--arch', 'smallest', '--dataset', 'folder',
                   '--datapath', str(folder), '--epochs', '3', '--warmup', '1', '--num-workers', '0',
                   '--output', str(tmp_path)])
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert 'before training, inherited weights: val_acc_subnet' in printed
    assert metrics['before_training']['val_balanced_subnet'] > 25  # the supernet's smallest subnet, inherited
    assert (tmp_path / 'subnet-best.pth').is_file() and (tmp_path / 'subnet.pth').is_file()
    assert 'holds the last epoch' in printed and metrics['best']['weights'] == 'subnet-best.pth'
    assert len(metrics['per_class']['subnet']) == 4 and 'per-class validation top-1 of the last epoch: subnet: ' \
        'diagonal' in printed and metrics['classes'] == sorted(IMBALANCED_SHARES)


def test_training_on_a_folder_of_class_folders_validates_on_images_held_out_of_it(tmp_path, capsys):
    """No val/ folder: training validates on a seeded tenth of each class, never on the images it
    trains on, says so once and records it with the run."""
    folder = write_image_folder(tmp_path / 'flat', ['a', 'b'], 10, size=8)
    output = tmp_path / 'run'
    scratch.main(['--dataset', 'folder', '--datapath', str(folder), '--epochs', '1', '--warmup', '0',
                  '--batch-size', '8', '--num-workers', '0', '--output', str(output)])
    line = (f'no val/ or test/ in {folder}: validating on 2 images (10% of each class, seeded) held out of its 20 '
            'images, training on the other 18')
    assert capsys.readouterr().out.count(line) == 1
    assert json.loads((output / 'metrics.json').read_text())['validation'] == line
    assert json.loads((output / 'run.json').read_text())['held_out_validation'] is True
    assert torch.load(output / 'supernet.pth', weights_only=True)['data']['validation'] == line


def test_the_small_recipe_keeps_the_detail_of_large_images():
    assert [recipes.input_size(side) for side in (28, 32, 50, 70, 300)] == [(32, 8, 0), (32, 8, 0), (48, 6, 0),
                                                                            (64, 8, 64), (96, 12, 64)]


def test_large_images_get_a_conv_stem_that_the_flag_turns_off(tmp_path, capsys):
    large = write_imbalanced_folder(tmp_path, images=40, size=70)
    args = scratch.parse_args(['--dataset', 'folder', '--datapath', str(large)])
    assert scratch.input_of(args) == {'img_size': 64, 'patch_size': 8, 'conv_stem': 64}
    assert 'resized to 64 px, a convolutional stem of 64 channels, patches of 8 px' in capsys.readouterr().out
    args = scratch.parse_args(['--dataset', 'folder', '--datapath', str(large), '--conv-stem', '0'])
    assert scratch.input_of(args)['conv_stem'] == 0
    assert 'resized to 64 px, patches of 8 px' in capsys.readouterr().out


def test_defaults_on_imbalanced_images_say_what_they_chose(folder, tmp_path, capsys):
    """The input size from the images, balanced sampling for imbalanced classes, the time an epoch takes: each said
    in one line by a run given no flag about them."""
    scratch.main(['--dataset', 'folder', '--datapath', str(folder), '--epochs', '1', '--warmup', '0',
                  '--num-workers', '0', '--output', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    assert out.count('input: images of about 40 px resized to 32 px, patches of 8 px') == 1
    assert out.count('imbalanced classes (the classes hold 8.0% to 54.0% of the training images): each is drawn '
                     'equally often (--no-balanced-sampling') == 1
    assert out.count('time: about ') == 1 and 's an epoch of training' in out
