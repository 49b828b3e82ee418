"""Data loading throughput: images/s of the training and evaluation transforms, per loader worker, on a
generated ImageNet-style folder of JPEGs (ImageNet's mean size, 400 x 350, quality 90).

    python bench/data_throughput.py --images 256 --workers 0 1 2
    python bench/data_throughput.py --images 512 --workers 0 2 4 --feed eager=1850   # workers to feed 1850 images/s

Prints figures, asserts nothing. ``--workers 0`` decodes in the main process: its images/s is one
core's rate. A GPU training at R images/s needs about R / (images/s per worker) loader workers, one core
each: ``--feed R`` prints that count from the best per-worker rate of the training transform measured here.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import samplers  # noqa: E402


def write_folder(root: Path, images: int, classes: int = 4, size: tuple[int, int] = (400, 350)) -> None:
    """``images`` JPEGs of smooth random content (compressing like photographs, not like noise)."""
    rng = np.random.default_rng(0)
    for index in range(images):
        folder = root / 'train' / f'n{index % classes:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        image.save(folder / f'{index}.JPEG', quality=90)
    (root / 'val').symlink_to(root / 'train')


def feed_rate(text: str) -> tuple[str, float]:
    """``NAME=RATE`` (``--feed``): a training rate and what it is the rate of."""
    name, _, rate = text.rpartition('=')
    if not name or not rate:
        raise argparse.ArgumentTypeError(f'{text!r}: give NAME=RATE, e.g. eager=1850')
    return name, float(rate)


def images_per_second(dataset: torch.utils.data.Dataset, workers: int, batch_size: int) -> float:
    loader = samplers.build_loader(dataset, batch_size, workers)
    batches = iter(loader)
    next(batches)  # worker start-up and the first batch are not throughput
    start, seen = time.perf_counter(), 0
    for images, _ in batches:
        seen += len(images)
    if seen == 0:  # a rate of 0 would read as a measurement
        raise SystemExit(f'{len(dataset)} images are one batch of {batch_size}: nothing is left to time after the '
                         'first batch; give --images more')
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=256, help='JPEGs to generate')
    parser.add_argument('--img-size', type=int, default=224, help='network input size')
    parser.add_argument('--batch-size', type=int, default=32, help='images per batch')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2], help='loader worker counts to time')
    parser.add_argument('--feed', type=feed_rate, nargs='*', default=[], metavar='NAME=RATE',
                        help='training images/s per GPU, named, to translate into the loader workers it takes')
    args = parser.parse_args()
    training_per_worker = 0.0
    torch.set_num_threads(1)  # one core per loader process, as in training
    with tempfile.TemporaryDirectory() as root:
        write_folder(Path(root), args.images)
        for split, training in (('train', True), ('val', False)):
            dataset = data.build_dataset('imagenet', root, split, args.img_size, training=training)
            for workers in args.workers:
                rate = images_per_second(dataset, workers, args.batch_size)
                per_worker = rate / max(workers, 1)
                if training:
                    training_per_worker = max(training_per_worker, per_worker)
                print(f'{"training" if training else "evaluation"} transform, {args.img_size} px, {workers} workers: '
                      f'{rate:.0f} images/s ({per_worker:.0f} per worker)')


    for name, rate in args.feed:
        workers = math.ceil(rate / training_per_worker)
        print(f'feeding {name} training, {rate:.0f} images/s per GPU, takes {workers} loader workers (one core each, '
              f'at {training_per_worker:.0f} images/s per worker): {8 * workers} cores for 8 GPUs')


if __name__ == '__main__':
    main()
