"""Tests of data.py, folders.py, image_folder.py and samplers.py: digits split, image folders with odd files,
ImageNet layouts, CIFAR-10, the DDP sampler, bad input."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

import data
import folders
import image_folder
import samplers
import search_data
from engine import evaluate as engine_evaluate
from fixtures import CIFAR_CLASSES, within, write_cifar10, write_image_folder
from utils import UserError

pytestmark = pytest.mark.fast  # make test-fast


def _items(dataset) -> list[tuple[torch.Tensor, int]]:
    return [dataset[i] for i in range(len(dataset))]


def test_digits_split_sizes_disjoint_and_deterministic():
    first = {split: idx.copy() for split, idx in data._digits_indices().items()}
    data._digits_indices.cache_clear()
    again = data._digits_indices()
    assert {split: len(idx) for split, idx in first.items()} == {'train': 1257, 'val': 180, 'test': 360}
    assert all(np.array_equal(first[split], again[split]) for split in data.SPLITS)
    assert len(np.unique(np.concatenate(list(first.values())))) == 1797
    for split in data.SPLITS:
        dataset = data.build_dataset('digits', None, split, 32)
        assert len(dataset) == len(first[split])
        assert set(dataset.labels.tolist()) == set(range(10))  # stratified: every class in every split


@pytest.mark.parametrize('training', [False, True])
def test_digits_samples(training):
    dataset = data.build_dataset('digits', None, 'val', 32, training=training)
    assert dataset.classes == [str(d) for d in range(10)] and data.num_classes('digits', None) == 10
    batch, labels = next(iter(samplers.build_loader(dataset, 64, 0)))
    assert batch.shape == (64, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])


def test_digits_cached_and_samples_are_copies():
    first = data.build_dataset('digits', None, 'test', 16)
    assert data.build_dataset('digits', None, 'test', 16).images is first.images
    image, _ = first[0]
    image.fill_(7)
    assert first[0][0].max() <= 1


def _write_odd_images(root: Path) -> Path:
    """Class a: RGB PNG, greyscale PNG, CMYK JPEG; class b: 16-bit PNG, RGB JPEG, truncated JPEG."""
    rng = np.random.default_rng(1)
    (root / 'a').mkdir(parents=True)
    (root / 'b').mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / 'a' / 'rgb.png')
    Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8), mode='L').save(root / 'a' / 'grey.png')
    Image.new('CMYK', (30, 30), (10, 200, 30, 0)).save(root / 'a' / 'cmyk.jpg')
    Image.fromarray(np.full((16, 16), 0x8000, dtype=np.uint16)).save(root / 'b' / 'grey16.png')
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / 'b' / 'good.jpg', quality=90)
    whole = (root / 'b' / 'good.jpg').read_bytes()
    (root / 'b' / 'truncated.jpg').write_bytes(whole[:len(whole) // 2])
    return root / 'b' / 'truncated.jpg'


def test_image_modes_decode_and_16_bit_is_rescaled(tmp_path):
    _write_odd_images(tmp_path)
    with Image.open(tmp_path / 'b' / 'grey16.png') as grey16:
        assert grey16.mode == 'I;16'
    assert np.asarray(image_folder._load_rgb(str(tmp_path / 'b' / 'grey16.png'))).max() == 128
    for name in ('a/rgb.png', 'a/grey.png', 'a/cmyk.jpg', 'b/good.jpg'):
        assert image_folder._load_rgb(str(tmp_path / name)).mode == 'RGB'


@pytest.mark.parametrize('training', [False, True])
def test_undecodable_images_are_left_out_of_evaluation_and_replaced_in_training(tmp_path, caplog, training):
    bad = _write_odd_images(tmp_path)
    # 'test': the whole folder (its train and val splits are held apart, test_a_folder_of_class_folders_...)
    dataset = data.build_dataset('folder', tmp_path, 'test', 32, training=training)
    assert dataset.classes == ['a', 'b'] and len(dataset) == 6 and data.num_classes('folder', tmp_path) == 2
    with caplog.at_level(logging.WARNING, logger='image_folder'):
        for _ in range(2):  # two epochs: still one warning
            batches = list(samplers.build_loader(dataset, 4, 0))
    images = torch.cat([images for images, _ in batches])
    assert images.shape == ((6 if training else 5), 3, 32, 32) and torch.isfinite(images).all()
    assert dataset.skipped == [str(bad)] and image_folder.undecodable_count(dataset) == 1
    assert len(caplog.records) == 1 and str(bad) in caplog.messages[0]


def _garbage_folder(root: Path, good: int = 4, bad: int = 1) -> Path:
    """Two classes of ``good`` PNGs and ``bad`` garbage .jpg files each."""
    write_image_folder(root, ['a', 'b'], good)
    for name in ('a', 'b'):
        for i in range(bad):
            (root / name / f'garbage{i}.jpg').write_bytes(os.urandom(300))
    return root


def test_evaluation_counts_each_decodable_image_once_and_reports_the_skipped(tmp_path):
    """25 files, 5 garbage: 20 images evaluated (each once, with its own label), 5 skipped,
    also through DataLoader worker processes."""
    root = write_image_folder(tmp_path, ['a', 'b', 'c', 'd', 'e'], 4)
    for name in 'abcde':
        (root / name / 'garbage.jpg').write_bytes(os.urandom(300))
    dataset = data.build_dataset('folder', root, 'test', 16)
    batches = list(samplers.build_loader(dataset, 3, 2))
    assert batches[-1] is None  # the last batch holds only a garbage file: left out whole
    labels = torch.cat([batch[1] for batch in batches if batch is not None])
    assert sorted(labels.tolist()) == sorted([0, 1, 2, 3, 4] * 4)
    assert image_folder.undecodable_count(dataset) == 5
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
    metrics = engine_evaluate(model, samplers.build_loader(dataset, 3, 2), progress=False)
    assert metrics['images'] == 20 and metrics['skipped'] == 5


def test_training_counts_the_images_it_substituted(tmp_path):
    root = _garbage_folder(tmp_path, good=3, bad=2)
    dataset = data.build_dataset('folder', root, 'test', 16, training=True)
    batches = list(samplers.build_loader(dataset, 2, 2, sampler=samplers.RankSampler(dataset, shuffle=True)))
    assert sum(len(labels) for _, labels in batches) == 10  # batches keep their size
    assert image_folder.undecodable_count(dataset) == 4


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    """An image over Pillow's pixel limit (such as a 30000x30000 PNG) is skipped and
    counted like any undecodable image; the limit is lowered here to keep the file small."""
    root = write_image_folder(tmp_path, ['a', 'b'], 2, size=16)
    Image.new('RGB', (200, 200)).save(root / 'a' / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 200 * 200 // 2 - 1)  # 2x over the limit: an error
    for training in (False, True):
        dataset = data.build_dataset('folder', root, 'test', 16, training=training)
        images = torch.cat([images for images, _ in samplers.build_loader(dataset, 5, 0)])
        assert len(images) == (5 if training else 4) and image_folder.undecodable_count(dataset) == 1


def test_fifo_and_symlink_loops_in_class_folders_are_left_out(tmp_path, caplog):
    """A FIFO named pipe.jpg would block the loader forever; a symlink loop would repeat the
    class's images, and a link to another class would give them the wrong label."""
    root = write_image_folder(tmp_path / 'data', ['a', 'b'], 2)
    os.mkfifo(root / 'a' / 'pipe.jpg')
    (root / 'a' / 'loop').symlink_to(root / 'a')
    (root / 'a' / 'other').symlink_to(root / 'b')
    (root / 'a' / 'broken.png').symlink_to(root / 'missing.png')
    outside = write_image_folder(tmp_path / 'elsewhere', ['x'], 1) / 'x'
    (root / 'b' / 'linked').symlink_to(outside)  # a link out of the dataset is followed
    with caplog.at_level(logging.WARNING, logger='image_folder'):
        dataset = within(20, lambda: data.build_dataset('folder', root, 'test', 16))
        labels = within(20, lambda: [label for _, batch in samplers.build_loader(dataset, 2, 0) for label in batch])
    assert sorted(int(label) for label in labels) == [0, 0, 1, 1, 1]
    assert sorted(Path(path).name for path, _ in dataset.samples) == ['0.png', '0.png', '0.png', '1.png', '1.png']
    assert any('left out 4 entries' in message for message in caplog.messages)
    assert folders.IMG_EXTENSIONS == IMG_EXTENSIONS  # torchvision's, written out in folders.py


def test_cifar10_folder_is_detected_without_dataset(tmp_path):
    """The README's CIFAR search passes only --datapath."""
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=3)
    assert folders.dataset_name(None, str(tmp_path)) == folders.dataset_name(None, str(folder)) == 'cifar10'
    write_image_folder(tmp_path / 'imagenet' / 'train', ['n01440764', 'n01443537'], 1)
    assert folders.dataset_name(None, str(tmp_path / 'imagenet')) == 'imagenet'
    assert folders.dataset_name(None, None) == 'digits' and folders.dataset_name('folder', str(folder)) == 'folder'


def test_a_folder_without_dataset_is_detected_or_refused(tmp_path):
    """Class folders that are not ImageNet's WordNet ids are a folder dataset (its recipe, not ImageNet's), whether
    in train/ or not; a folder holding no dataset, or none at all, is refused."""
    write_image_folder(tmp_path / 'cells' / 'train', ['cracked', 'intact'], 1)
    write_image_folder(tmp_path / 'flat', ['cat', 'dog'], 1)
    assert folders.dataset_name(None, str(tmp_path / 'cells')) == folders.dataset_name(None, str(tmp_path / 'flat')) \
        == 'folder'
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='holds no CIFAR-10 batches, Fashion-MNIST files or class folders'):
        folders.dataset_name(None, str(tmp_path / 'empty'))
    with pytest.raises(UserError, match='does not exist'):
        folders.dataset_name(None, str(tmp_path / 'missing'))


def test_loader_with_workers(tmp_path):
    _write_odd_images(tmp_path)
    dataset = data.build_dataset('folder', tmp_path, 'test', 24)
    loader = samplers.build_loader(dataset, 3, 2, sampler=samplers.RankSampler(dataset, shuffle=True))
    assert loader.persistent_workers and loader.prefetch_factor == 4
    assert loader.pin_memory == torch.cuda.is_available()
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1]  # the truncated JPEG of class b is left out of evaluation


def test_folder_split_folders(tmp_path):
    write_image_folder(tmp_path / 'train', ['x', 'y', 'z'], 2)
    write_image_folder(tmp_path / 'test', ['x', 'y', 'z'], 1)
    assert len(data.build_dataset('folder', tmp_path, 'train', 16)) == 6
    assert len(data.build_dataset('folder', tmp_path, 'val', 16)) == 3  # test/ stands in for val/
    assert data.num_classes('folder', tmp_path) == 3


def _paths(dataset) -> list[str]:
    if isinstance(dataset, torch.utils.data.Subset):
        return [_paths(dataset.dataset)[i] for i in dataset.indices]
    return [path for path, _ in dataset.samples]


@pytest.mark.parametrize('layout', ['class folders', 'train/ alone'])
def test_a_folder_without_validation_images_holds_a_seeded_tenth_of_each_class_out_of_training(tmp_path, layout):
    """Training never validates on its training images; the search split of training images holds
    none of the validation images."""
    root = tmp_path / 'data'
    for name, images in {'a': 20, 'b': 9, 'c': 2}.items():
        write_image_folder(root if layout == 'class folders' else root / 'train', [name], images, size=8)
    train, val = (data.build_dataset('folder', root, split, 8) for split in ('train', 'val'))
    assert not set(_paths(train)) & set(_paths(val))
    assert sorted(_paths(train) + _paths(val)) == sorted(str(path) for path in root.rglob('*.png'))
    assert np.bincount(val.targets).tolist() == [2, 1, 1] and np.bincount(train.targets).tolist() == [18, 8, 1]
    assert train.classes == val.classes == ['a', 'b', 'c'] and image_folder.undecodable_count(train) == 0
    assert _paths(data.build_dataset('folder', root, 'val', 8)) == _paths(val)  # the same images on every call
    assert folders.carves_validation('folder', root) and folders.profile_folder('folder', root).train_images == 27
    search = search_data.search_split('folder', root, 8)
    if layout == 'class folders':  # searched on the folder itself, as it says
        assert len(search) == 31 and data.split_read('folder', root, 'test') == f'all of {root} (no split folders)'
    else:
        assert set(_paths(search)) <= set(_paths(train))
        with pytest.raises(UserError, match=r'has train/ but no test/ or val/ folder: .*--split val reads the images'):
            data.build_dataset('folder', root, 'test', 8)


def test_a_class_of_one_image_is_refused_only_where_validation_is_held_out(tmp_path):
    write_image_folder(tmp_path, ['a'], 3)
    write_image_folder(tmp_path, ['b'], 1)
    for split in ('train', 'val'):
        with pytest.raises(UserError, match=rf'class b has a single image \({tmp_path / "b" / "0.png"}\).*add images'):
            data.build_dataset('folder', tmp_path, split, 8)
    assert len(data.build_dataset('folder', tmp_path, 'test', 8)) == 4  # evaluating the folder: all of it


def test_imagenet_layouts(tmp_path):
    write_image_folder(tmp_path / 'train', ['n01', 'n02'], 3)
    write_image_folder(tmp_path / 'val', ['n01', 'n02'], 2)
    assert len(data.build_dataset('imagenet', tmp_path, 'train', 32, training=True)) == 6
    for split in ('val', 'test'):
        dataset = data.build_dataset('imagenet', tmp_path, split, 32)
        assert len(dataset) == 4 and dataset.classes == ['n01', 'n02']
        assert dataset[0][0].shape == (3, 32, 32)
    assert data.num_classes('imagenet', tmp_path) == 2
    direct = data.build_dataset('imagenet', tmp_path / 'val', 'test', 32)
    assert len(direct) == 4 and direct.root == str(tmp_path / 'val')
    # Training on a split folder validates on images held out of it: one of each class's two.
    assert [len(data.build_dataset('imagenet', tmp_path / 'val', split, 32)) for split in ('train', 'val')] == [2, 2]
    assert data.num_classes('imagenet', str(tmp_path / 'val')) == 2


def test_imagenet_eval_transform_is_deit():
    steps = image_folder.image_transform(224, training=False).transforms
    assert steps[0].size == 256 and steps[1].size == (224, 224)


@pytest.mark.parametrize('training', [False, True])
def test_small_images_keep_the_whole_image(training):
    """At 32 px and below no RandomResizedCrop (down to 8% of the image) and no centre crop: every pixel of a
    32 px image stays, shifted by at most 4 pixels in training."""
    from PIL import Image

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # left half white
    transform = image_folder.image_transform(32, training=training)
    names = [type(step).__name__ for step in transform.transforms]
    assert 'RandomResizedCrop' not in names and 'CenterCrop' not in names
    torch.manual_seed(0)
    for _ in range(20):
        white = transform(Image.fromarray(pixels)).mean(dim=0) > 0
        assert abs(int(white.sum()) - 16 * 32) <= 4 * 32 + 4 * 16 + 16  # a shifted crop keeps most of the half


def test_training_transform_is_the_official_one_with_random_erasing_in_pixel_mode():
    from timm.data.random_erasing import RandomErasing
    steps = image_folder.image_transform(224, training=True).transforms
    erasing = [step for step in steps if isinstance(step, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].mode == 'pixel' and erasing[0].probability == 0.25
    assert erasing[0].max_count == 1
    torch.manual_seed(0)
    erased = erasing[0](torch.zeros(3, 224, 224).clone())
    while not erased.any():  # erasing is applied to a quarter of the images
        erased = erasing[0](torch.zeros(3, 224, 224))
    values = erased[erased != 0]
    assert values.unique().numel() > 1000  # per-pixel random values, not one constant


@pytest.mark.parametrize('inside', [False, True])
def test_cifar10_both_datapath_forms(tmp_path, inside):
    folder = write_cifar10(tmp_path, n_train_per_batch=4, n_test=6)
    datapath = folder if inside else tmp_path
    train = data.build_dataset('cifar10', str(datapath), 'train', 32, training=True)
    assert len(train) == 20 and train.classes == list(CIFAR_CLASSES)
    for split in ('val', 'test'):
        assert len(data.build_dataset('cifar10', datapath, split, 32)) == 6
    image, label = data.build_dataset('cifar10', datapath, 'test', 32)[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and 0 <= label < 10
    assert data.num_classes('cifar10', datapath) == 10


@pytest.mark.parametrize('training', [False, True])
def test_cifar10_resized(tmp_path, training):
    write_cifar10(tmp_path, 2, 2)
    assert data.build_dataset('cifar10', tmp_path, 'test', 48, training=training)[1][0].shape == (3, 48, 48)


def test_cifar10_pixels_match_file(tmp_path):
    folder = write_cifar10(tmp_path, 1, 2)
    raw = pickle.loads((folder / 'test_batch').read_bytes())[b'data'][1].reshape(3, 32, 32)
    image, _ = data.build_dataset('cifar10', tmp_path, 'test', 32)[1]
    mean = torch.tensor(image_folder.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(image_folder.IMAGENET_STD)[:, None, None]
    assert torch.allclose(image * std + mean, torch.from_numpy(raw).float() / 255, atol=1e-5)


@pytest.mark.parametrize('dataset', ['imagenet', 'folder', 'cifar10'])
def test_missing_datapath(dataset):
    with pytest.raises(UserError, match='--datapath'):
        data.build_dataset(dataset, None, 'val', 32)


@pytest.mark.parametrize('dataset', ['imagenet', 'folder', 'cifar10'])
def test_datapath_does_not_exist(tmp_path, dataset):
    with pytest.raises(UserError, match='does not exist') as err:
        data.build_dataset(dataset, tmp_path / 'nope', 'val', 32)
    assert str(tmp_path / 'nope') in str(err.value)


@pytest.mark.parametrize('dataset', ['imagenet', 'folder'])
def test_empty_folder(tmp_path, dataset):
    with pytest.raises(UserError) as err:
        data.build_dataset(dataset, tmp_path, 'val', 32)
    assert str(tmp_path) in str(err.value) and 'class folders' in str(err.value)
    with pytest.raises(UserError, match='class folders'):
        data.num_classes(dataset, tmp_path)


def test_class_folder_without_images(tmp_path):
    write_image_folder(tmp_path, ['cat'], 1)
    (tmp_path / 'dog').mkdir()
    (tmp_path / 'dog' / 'notes.txt').write_text('not an image')
    with pytest.raises(UserError, match='has no images') as err:
        data.build_dataset('folder', tmp_path, 'train', 32)
    assert str(tmp_path / 'dog') in str(err.value)


def test_imagenet_root_without_val(tmp_path):
    write_image_folder(tmp_path / 'train', ['n01'], 1)
    with pytest.raises(UserError, match='val/') as err:
        data.build_dataset('imagenet', tmp_path, 'val', 32)
    assert str(tmp_path) in str(err.value)


def test_folder_with_other_split_folders_only(tmp_path):
    write_image_folder(tmp_path / 'val', ['x'], 1)
    with pytest.raises(UserError, match='no train/ folder') as err:
        data.build_dataset('folder', tmp_path, 'train', 32)
    assert str(tmp_path) in str(err.value) and 'then validates on 10% of each class, held out' in str(err.value)


def test_all_images_corrupt(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    training = data.build_dataset('folder', tmp_path, 'test', 32, training=True)
    with pytest.raises(UserError, match='no image under .* can be decoded'):
        training[0]
    evaluation = samplers.build_loader(data.build_dataset('folder', tmp_path, 'test', 32), 4, 0)
    with pytest.raises(UserError, match='no image of the evaluation data could be decoded'):
        engine_evaluate(torch.nn.Flatten(), evaluation, progress=False)


@pytest.mark.parametrize('split, missing', [('train', 'data_batch_3'), ('test', 'test_batch'),
                                            ('val', 'batches.meta')])
def test_cifar10_missing_files(tmp_path, split, missing):
    folder = write_cifar10(tmp_path, 1, 1)
    (folder / missing).unlink()
    with pytest.raises(UserError, match=missing) as err:
        data.build_dataset('cifar10', tmp_path, split, 32)
    assert str(folder) in str(err.value)


def test_cifar10_folder_without_files(tmp_path):
    with pytest.raises(UserError, match='data_batch_1') as err:
        data.build_dataset('cifar10', tmp_path, 'train', 32)
    assert str(tmp_path) in str(err.value)


class _RunsCode:
    def __reduce__(self):
        return print, ('this must not run',)


@pytest.mark.parametrize('content', [b'truncated', pickle.dumps({b'data': _RunsCode(), b'labels': []}),
                                     pickle.dumps({b'labels': [1]})])
def test_cifar10_bad_or_unsafe_batch(tmp_path, capsys, content):
    folder = write_cifar10(tmp_path, 1, 1)
    (folder / 'test_batch').write_bytes(content)
    with pytest.raises(UserError, match='not a CIFAR-10 python batch') as err:
        data.build_dataset('cifar10', folder, 'test', 32)
    assert str(folder / 'test_batch') in str(err.value)
    assert 'this must not run' not in capsys.readouterr().out


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="'mnist'.*imagenet, cifar10, digits, fashion-mnist, folder"):
        data.build_dataset('mnist', None, 'train', 32)
    with pytest.raises(UserError, match="'mnist'"):
        data.num_classes('mnist', None)
    with pytest.raises(UserError, match="'valid'.*train, val, test"):
        data.build_dataset('digits', None, 'valid', 32)


def test_imagenet_training_augmentation_survives_every_randaugment_draw():
    """rand-m9-mstd0.5-inc1 draws 0-bit posterize at times, which Pillow 11 refuses; it must not crash training."""
    from PIL import Image

    transform = image_folder.image_transform(48, training=True)
    image = Image.new('RGB', (40, 40), (200, 100, 50))
    torch.manual_seed(0)
    for _ in range(300):
        assert transform(image).shape == (3, 48, 48)


def test_raw_imagenet_layout_with_a_flat_val_folder_is_not_read_as_two_classes(tmp_path):
    """train/<class>/ beside a flat val/ (ImageNet as downloaded) must not become classes 'train' and 'val'."""
    write_image_folder(tmp_path / 'train', ['n01', 'n02'], 2)
    Image.new('RGB', (16, 16)).save((tmp_path / 'val').mkdir() or tmp_path / 'val' / 'ILSVRC_val_1.png')
    assert len(data.build_dataset('imagenet', tmp_path, 'train', 16)) == 4
    with pytest.raises(UserError, match='holds no class folders'):
        data.build_dataset('imagenet', tmp_path, 'val', 16)


def test_cifar10_labels_outside_the_classes_are_refused(tmp_path):
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=3)
    batch = pickle.loads((folder / 'test_batch').read_bytes())
    for label in (10, -1, 'cat'):
        batch[b'labels'][0] = label
        (folder / 'test_batch').write_bytes(pickle.dumps(batch))
        with pytest.raises(UserError, match='not CIFAR-10 data'):
            data.build_dataset('cifar10', tmp_path, 'test', 32)


def _rank_order(rank: int, port: int, repeats: int, shuffle: bool, orders) -> None:
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    sampler = samplers.RankSampler(range(1257), shuffle=shuffle, repeats=repeats, seed=3)
    sampler.set_epoch(1)
    orders[rank] = (len(sampler), list(sampler))
    torch.distributed.destroy_process_group()


def orders_of_two_ranks(repeats: int, shuffle: bool = True) -> list[tuple[int, list[int]]]:
    """What each of two real gloo DDP ranks reads in one epoch through samplers.RankSampler."""
    import multiprocessing
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context('fork')
    with context.Manager() as manager:
        orders = manager.dict()
        ranks = [context.Process(target=_rank_order, args=(rank, port, repeats, shuffle, orders)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(60)
        assert all(process.exitcode == 0 for process in ranks)
        return [orders[0], orders[1]]


def test_ddp_ranks_read_each_image_three_times_across_ranks_with_repeated_augmentation():
    from collections import Counter
    orders = orders_of_two_ranks(repeats=samplers.REPEATS)
    assert [length for length, _ in orders] == [len(order) for _, order in orders] == [512, 512]
    counts = Counter(orders[0][1] + orders[1][1])
    assert sum(counts.values()) == 1024 and sorted(set(counts.values())) in ([3], [1, 3], [2, 3])
    assert sum(1 for c in counts.values() if c != 3) <= 1  # only the image cut by the 1024 bound has fewer
    both = set(orders[0][1]) & set(orders[1][1])
    assert len(both) > 300  # a repeated image goes to both ranks (each its own augmentation)
    assert samplers.images_per_rank(1257, 2, samplers.REPEATS) == 512


def test_ddp_ranks_split_the_images_without_repeated_augmentation():
    orders = orders_of_two_ranks(repeats=1)
    assert [len(order) for _, order in orders] == [629, 629] == [samplers.images_per_rank(1257, 2, 1)] * 2
    assert set(orders[0][1]) | set(orders[1][1]) == set(range(1257))
    assert len(orders[0][1] + orders[1][1]) - len(set(orders[0][1] + orders[1][1])) == 1  # one pad to even shards
    validation = orders_of_two_ranks(repeats=samplers.REPEATS, shuffle=False)  # validation never repeats
    assert sorted(validation[0][1] + validation[1][1]) == sorted([*range(1257), 0])


def test_small_inputs_decode_each_image_once(tmp_path):
    """Inputs of 96 px or less keep each decoded, resized image: a later epoch reads no file (here: none left)."""
    root = write_image_folder(tmp_path / 'images', ['a', 'b'], 2, size=40)
    images = image_folder.split_images('folder', root, 'train', 32, training=True)
    first = [images[i][0] for i in range(len(images))]
    for path, _ in images.samples:
        os.remove(path)
    assert [images[i][0].shape for i in range(len(images))] == [image.shape for image in first] == [(3, 32, 32)] * 4
    assert not images.undecodable.any()


def test_a_figure_on_the_images_that_trained_or_chose_the_weights_says_it_is_optimistic(tmp_path):
    split = write_image_folder(tmp_path / 'split' / 'train', ['a', 'b'], 3).parent
    write_image_folder(split / 'val', ['a', 'b'], 2)
    chose = {**data.trained_on('folder', split), 'best_chosen_on': data.split_read('folder', split, 'val')}
    assert 'trained on' in data.optimism(chose, 'folder', split, 'train')
    assert 'scored best on this same split' in data.optimism(chose, 'folder', split, 'val')
    assert data.optimism(data.trained_on('folder', split), 'folder', split, 'val') is None  # the last epoch's
    assert data.optimism(chose, 'folder', tmp_path / 'elsewhere', 'val') is None
    flat = write_image_folder(tmp_path / 'flat', ['a', 'b'], 20)  # validated on 10% held out of it
    chose = {**data.trained_on('folder', flat), 'best_chosen_on': data.split_read('folder', flat, 'val')}
    assert 'trained on' in data.optimism(chose, 'folder', flat, 'test')  # the whole folder
    assert 'scored best' in data.optimism(chose, 'folder', flat, 'val')
