"""Fashion-MNIST: where it is read from, its splits (the test set selects nothing), bad files, the recipe."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import data
import search_data
from fixtures import write_fashion_mnist
from utils import UserError

installed = pytest.mark.skipif(not data.FASHION_SYSTEM_PATH.is_dir(),
                               reason='needs Debian\'s dataset-fashion-mnist (.ci/run installs it)')


@pytest.mark.parametrize('layout', ['flat-gz', 'torchvision-raw'])
def test_reads_datapath_in_either_layout(tmp_path, layout):
    folder = tmp_path / 'FashionMNIST' / 'raw' if layout == 'torchvision-raw' else tmp_path
    write_fashion_mnist(folder, 240, 30, compress=layout == 'flat-gz')
    splits = {split: data.build_dataset('fashion-mnist', tmp_path, split, 28) for split in data.SPLITS}
    assert {split: len(d) for split, d in splits.items()} == {'train': 220, 'val': 20, 'test': 30}
    assert Counter(splits['val'].targets) == {label: 2 for label in range(10)}  # one twelfth, class-balanced
    image, label = splits['train'][0]
    assert image.shape == (3, 28, 28) and -1 <= image.min() and image.max() <= 1 and 0 <= label < 10
    assert splits['test'].classes[0] == 'T-shirt/top' and data.num_classes('fashion-mnist', tmp_path) == 10


def test_validation_is_held_out_of_training_and_fixed(tmp_path):
    write_fashion_mnist(tmp_path, 240, 30)
    images, labels = data._fashion_arrays(data.fashion_mnist_folder(tmp_path), 'train')
    split = data.fashion_mnist_indices(labels)
    assert not set(split['train']) & set(split['val']) and len(split['train']) + len(split['val']) == 240
    assert data.fashion_mnist_indices(labels) == split
    search = search_data.search_split('fashion-mnist', tmp_path, 28)
    assert torch.equal(torch.stack([search[i][0] for i in range(len(search))]),
                       torch.stack([data.build_dataset('fashion-mnist', tmp_path, 'val', 28)[i][0]
                                    for i in range(len(search))]))


def test_missing_data_names_the_package_and_the_layout(tmp_path):
    with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist.*FashionMNIST/raw'):
        data.build_dataset('fashion-mnist', tmp_path, 'train', 28)
    with pytest.raises(UserError, match='does not exist'):
        data.build_dataset('fashion-mnist', tmp_path / 'nowhere', 'train', 28)


@pytest.mark.parametrize('damage', ['truncated', 'not-gzip', 'wrong-magic'])
def test_damaged_file_is_refused_in_one_line(tmp_path, damage):
    write_fashion_mnist(tmp_path, 24, 10)
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    import gzip
    content = gzip.decompress(path.read_bytes())
    path.write_bytes({'truncated': gzip.compress(content[:-100]), 'not-gzip': b'hello',
                      'wrong-magic': gzip.compress(b'\0\0\x08\x01' + content[4:])}[damage])
    data._fashion_arrays.cache_clear()
    with pytest.raises(UserError, match='train-images-idx3-ubyte.gz'):
        data.build_dataset('fashion-mnist', tmp_path, 'train', 28)


@installed
def test_the_installed_release():
    sizes = {split: len(data.build_dataset('fashion-mnist', None, split, 28)) for split in data.SPLITS}
    assert sizes == {'train': 55_000, 'val': 5_000, 'test': 10_000}
    assert Counter(data.build_dataset('fashion-mnist', None, 'val', 28).targets) == {c: 500 for c in range(10)}


def test_scratch_defaults_for_fashion_mnist():
    import scratch

    args = scratch.parse_args(['--dataset', 'fashion-mnist'])
    assert (args.name, args.mixup, args.cutmix, args.output) == ('fashion', 0.0, 0.0, 'outputs/scratch-fashion-mnist')
