"""A researcher's own images, the hard way: large grayscale images, imbalanced classes that differ only in thin
details, trained with scratch.py's defaults and nothing else, against a negative control with shuffled labels.

    python bench/thin_details.py                          # writes bench/results/thin-details.md
    python bench/thin_details.py --images 400 --epochs 2 --work /tmp/thin --report /tmp/thin.md   # a quick check

The images stand in for electroluminescence images of solar cells (300 px, grayscale, busbars and fingers,
uneven brightness and noise). The classes, 58% / 27% / 11% / 4% of the images as in the public ELPV data set,
differ only in defects two pixels wide: none, one crack, two crossing cracks, a cluster of small dark spots.
A 32 px input loses them; the chosen input size must keep them. The figures are the last epoch's validation on
val/ of the smallest and the largest subnet. Three runs: the defaults; the defaults without the convolutional stem
(``--conv-stem 0``, the official patch embedding); and a control trained the same way on the same images with the
training labels shuffled (each class keeps its size), whose balanced accuracy must stay near chance (25%, the
majority answer's too) while the defaults' must be far above it.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {'intact': 0.58, 'crack': 0.27, 'crossed': 0.11, 'spots': 0.04}


# What varies between cells besides the defects: brightness slope, blotches (up to this many) and pixel noise.
CLUTTER = {'high': (40, 4, 9), 'low': (10, 0, 5)}


def cell(rng: np.random.Generator, side: int, clutter: str = 'high') -> Image.Image:
    """A defect-free cell: uneven brightness, three busbars, faint fingers, noise and a few dark blotches."""
    slope, blotches, noise = CLUTTER[clutter]
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pixels = 150 + slope * rng.uniform(-1, 1) * (x - 0.5) + slope * rng.uniform(-1, 1) * (y - 0.5)
    pixels += 8 * np.sin(2 * np.pi * x * rng.integers(20, 30))  # fingers
    for bar in np.linspace(0.2, 0.8, 3) + rng.uniform(-0.02, 0.02, 3):
        pixels[np.abs(y - bar) < 0.012] -= 45  # busbars
    for _ in range(rng.integers(0, blotches + 1)):  # blotches: wide and soft, unlike a defect
        cy, cx, radius = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.15)]
        pixels -= 25 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / radius ** 2)
    pixels += rng.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode='L')


def crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    """A dark line two pixels wide and a third to two thirds of the cell long, at any angle."""
    cx, cy = rng.uniform(0.25, 0.75, 2) * side
    angle, length = rng.uniform(0, np.pi), rng.uniform(side / 3, 2 * side / 3)
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=int(rng.uniform(40, 70)), width=2)


def image_of(kind: str, rng: np.random.Generator, side: int, clutter: str = 'high') -> Image.Image:
    image = cell(rng, side, clutter)
    draw = ImageDraw.Draw(image)
    if kind in ('crack', 'crossed'):
        crack(draw, rng, side)
    if kind == 'crossed':
        crack(draw, rng, side)
    if kind == 'spots':
        cx, cy = rng.uniform(0.25, 0.75, 2) * side
        for _ in range(rng.integers(4, 8)):
            px, py = cx + rng.normal(0, side / 20), cy + rng.normal(0, side / 20)
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=int(rng.uniform(40, 70)))
    return image


def write_data(root: Path, images: int, side: int, seed: int, clutter: str = 'high') -> Path:
    """``root/{train,val}/<class>/<i>.png``: ``images`` training images and a quarter as many for validation, written
    under another name and renamed when whole (a run stopped while writing leaves no half folder to be reused)."""
    partial = root.with_name(root.name + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in (('train', images), ('val', images // 4)):
        for kind, share in CLASSES.items():
            folder = partial / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(max(round(count * share), 4)):
                image_of(kind, rng, side, clutter).save(folder / f'{i}.png')
    return partial.rename(root)


def shuffled_copy(root: Path, control: Path, seed: int) -> Path:
    """``root`` with its training images' labels shuffled (links, each class keeping its size); val/ as it is."""
    files = sorted((root / 'train').glob('*/*.png'))
    labels = [path.parent.name for path in files]
    order = np.random.default_rng(seed).permutation(len(files))
    for i, (path, label) in enumerate(zip((files[j] for j in order), labels)):
        target = control / 'train' / label / f'{i}.png'
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path)
    if not (control / 'val').exists():
        (control / 'val').symlink_to(root / 'val')
    return control


def train(datapath: Path, output: Path, extra: list[str]) -> dict:
    """scratch.py with its defaults (and ``extra``); its last epoch's validation on val/ (metrics.json)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, 'scratch.py', '--dataset', 'folder', '--datapath', str(datapath), '--output',
                    str(output), *extra], cwd=ROOT, check=True)
    return {**json.loads((output / 'metrics.json').read_text()), 'minutes': (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=2000, help='training images (val/: a quarter as many)')
    parser.add_argument('--side', type=int, default=300, help='image side in pixels')
    parser.add_argument('--epochs', type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument('--clutter', choices=list(CLUTTER), default='high',
                        help='what varies between cells besides the defects (brightness slope, blotches, noise)')
    parser.add_argument('--work', default='outputs/thin-details', help='folder of the data and the runs')
    parser.add_argument('--report', default=str(ROOT / 'bench' / 'results' / 'thin-details.md'))
    args = parser.parse_args()
    work = Path(args.work).resolve()
    data = work / f'data-{args.images}-{args.side}' if args.clutter == 'high' else \
        work / f'data-{args.images}-{args.side}-{args.clutter}'
    if not data.is_dir():
        write_data(data, args.images, args.side, seed=0, clutter=args.clutter)
    extra = ['--epochs', str(args.epochs), '--warmup', '1'] if args.epochs else []
    runs = {'defaults': train(data, work / f'run-{args.clutter}', extra),
            'no conv stem': train(data, work / f'run-{args.clutter}-no-stem', [*extra, '--conv-stem', '0']),
            'shuffled labels': train(shuffled_copy(data, work / f'control-data-{args.clutter}', 1),
                                     work / f'control-{args.clutter}', extra)}
    write_report(Path(args.report), runs, args)


def write_report(path: Path, runs: dict[str, dict], args: argparse.Namespace) -> None:
    lines = [f'# Thin details on large imbalanced images (`python bench/thin_details.py`, {os.cpu_count()} CPUs)', '',
             f'{args.images} training images of {args.side} px, classes '
             + ', '.join(f'{name} {share:.0%}' for name, share in CLASSES.items())
             + '; validation on val/ (a quarter as many, the same shares). Always answering the largest class: '
               f'top-1 {100 * max(CLASSES.values()):.1f}, balanced 25.0.', '',
             '| run | minutes | top-1 | balanced | ' + ' | '.join(CLASSES) + ' |',
             '|---|---|---|---|' + '---|' * len(CLASSES)]
    for name, results in runs.items():
        for subnet in ('min', 'max'):
            per_class = dict(zip(results['classes'], results['per_class'][subnet]))
            lines.append(f"| {name}, {subnet} subnet | {results['minutes']:.1f} | {results[f'val_acc_{subnet}']:.1f} | "
                         f"{results[f'val_balanced_{subnet}']:.1f} | "
                         + ' | '.join(f'{per_class[c]:.1f}' for c in CLASSES) + ' |')
    path.write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
