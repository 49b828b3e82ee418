"""The training recipes of scratch.py and finetune.py (the defaults of their flags), and the choice of
one from the data: a dataset's own, or for a folder of images the paper's or the small-data one; the size of the
search split. Plain values (the scripts print them in --help before torch loads)."""
from __future__ import annotations

from typing import Any, Mapping

import folders
from arch import STEM_STRIDE

# The learning rate is base_lr x global batch / 512 (the official rule) unless --learning-rate gives it. The
# schedule is the official per-epoch cosine for the long runs; the short runs of the small data sets step it
# every step (a per-epoch warmup would hold a 1-epoch run at --warmup-lr). Every recipe keeps the paper's floor
# rates, weight decay and label smoothing; the paper's augmentation (Mixup, CutMix, drop path) is for the long runs.
_COMMON = dict(min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05, smoothing=0.1)
_PAPER = dict(_COMMON, mixup=0.8, cutmix=1.0, drop_path=0.1, batch_size=128, schedule='epoch')
_SHORT = dict(_COMMON, mixup=0.0, cutmix=0.0, drop_path=0.0, schedule='step')
SCRATCH = {
    'imagenet': dict(_PAPER, epochs=500, warmup=20, base_lr=5e-4),  # the paper's (DeiT's)
    'cifar10': dict(_PAPER, epochs=300, warmup=20, base_lr=5e-4),
    # A folder of few or small images (choose_recipe), on the demo space at a size chosen from the images
    # (input_size): a rate that learns in tens of epochs, no Mixup/CutMix; inputs up to 96 px get shifted crops and
    # flips only (image_folder.py). Unsampled layers as the official run: the skip is within a standard error over
    # 3 seeds on 300 px images (bench/results/unsampled-folder.md).
    'small': dict(_SHORT, epochs=50, warmup=3, base_lr=8e-3, batch_size=64),
    # Sized for a laptop CPU: base_lr x 32 / 512 = 2e-3 at its batch 32. Unsampled layers left alone: the smallest
    # subnet 1.85 points (2.6 standard errors) better over 3 seeds (bench/results/unsampled-digits.md).
    'digits': dict(_SHORT, epochs=40, warmup=2, base_lr=3.2e-2, batch_size=32, skip_unsampled=True),
    # Small images: no Mixup/CutMix or RandAugment (they slow a short run down), flips only (data.py); batch 128
    # (1.5e-3): more images per second than 64 on a small CPU (bench/results/recipes-notes.md). Unsampled layers as
    # the official run: the skip is within a standard error over 2 seeds (bench/results/unsampled-fashion-mnist.md).
    'fashion-mnist': dict(_SHORT, epochs=26, warmup=2, base_lr=6e-3, batch_size=128),
}
# Retraining one subnet (scratch.py --arch), the official --mode retrain: its script's defaults, 300 epochs and
# 5 of warmup, where the supernet recipe is the paper's (the small data sets' recipes stay as they are).
RETRAIN = {name: dict(epochs=300, warmup=5) for name in ('imagenet', 'cifar10')}
DEFAULT_PRESETS = {'digits': 'demo', 'fashion-mnist': 'fashion', 'small': 'demo'}  # by recipe; else tiny

# The learning rate is base_lr x global batch / 512 (the official rule, as scratch.py's) unless --learning-rate
# gives it: 5e-4 at the default batch 128 on 4 GPUs.
_IMAGENET = dict(_PAPER, epochs=100, warmup=5, base_lr=5e-4)
FINETUNE = {
    'imagenet': _IMAGENET,
    'cifar10': _IMAGENET,
    'small': dict(_SHORT, epochs=30, warmup=2, base_lr=4e-3, batch_size=64),
    'digits': dict(_SHORT, epochs=5, warmup=1, base_lr=4e-3, batch_size=64),
    'fashion-mnist': dict(_SHORT, epochs=1, warmup=0, base_lr=1.6e-3, batch_size=64),
}


# A folder of fewer training images than this, or of images this small, gets the `small` recipe: the
# paper's (500 epochs of heavy augmentation at a learning rate scaled down with the batch) is for ImageNet.
SMALL_DATA_IMAGES, SMALL_DATA_SIDE = 50_000, 64


def choose_recipe(dataset: str, datapath: str | None) -> tuple[str, str]:
    """The recipe that fits the data, and why: a dataset's own, else (a folder) from its size and images."""
    if dataset != 'folder':
        return dataset, f'the {dataset} recipe'
    profile = folders.profile_folder(dataset, datapath)  # a folder that cannot be read is refused here, first
    described = f'{profile.train_images} training images of about {profile.side} px'
    if profile.train_images < SMALL_DATA_IMAGES or profile.side <= SMALL_DATA_SIDE:
        return 'small', f'{described}: fewer than {SMALL_DATA_IMAGES} images or sides of {SMALL_DATA_SIDE} px or less'
    return 'imagenet', f'{described}: an ImageNet-sized folder'


# The small recipe keeps a folder's detail up to 96 px (never enlarging its images) on a grid of 8 x 8 patches, which
# a CPU trains the demo space on in minutes; 32 px inputs keep the demo space's 4 x 4 grid of 8 px patches. Larger
# inputs get a convolutional stem where their patches allow its stride: without one, a supernet trained from scratch
# on 2,000 images of 300 px never learned a defect two pixels wide (balanced accuracy 25%, chance; with it 90%+,
# bench/results/thin-details.md).
INPUT_SIDES = (32, 48, 64, 96)
STEM_CHANNELS = 64


def input_size(side: int) -> tuple[int, int, int]:
    """The input size, patch size and conv stem channels (0: none) the small recipe trains images of ``side`` px at."""
    size = max([s for s in INPUT_SIDES if s <= side], default=INPUT_SIDES[0])
    patch = 8 if size == INPUT_SIDES[0] else size // 8
    return size, patch, STEM_CHANNELS if size > INPUT_SIDES[0] and patch % STEM_STRIDE == 0 else 0


RECIPE_KEYS = ('epochs', 'warmup', 'base_lr', 'batch_size', 'min_lr', 'warmup_lr', 'weight_decay', 'smoothing',
               'mixup', 'cutmix', 'drop_path')


def describe_recipes(recipes: Mapping[str, Mapping[str, Any]], chosen: str, why: str) -> str:
    """The epilog of a training script's --help: every recipe's values, and which one this command line gets."""
    lines = [f'recipes (this command line: {chosen}, {why}); the learning rate is base_lr x global batch / 512 '
             'unless --learning-rate gives it:']
    for name, recipe in recipes.items():
        lines.append(f'  {name}: ' + ', '.join(f'{key} {recipe[key]:g}' for key in RECIPE_KEYS if key in recipe))
    return '\n'.join(lines)


SEARCH_IMAGES_PER_CLASS = 100  # the search split: the paper's subImageNet, 100 training images of each ImageNet class
