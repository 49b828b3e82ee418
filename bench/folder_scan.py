"""Scanning an image folder: image_folder.SafeImageFolder's walker (regular files only, each folder once) beside
torchvision's make_dataset, on a generated tree of empty ``.jpg`` files.

    python bench/folder_scan.py --classes 100 --per-class 500 --repeats 3

Prints figures, asserts nothing (but says whether both give the same sample list).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset  # noqa: E402

import image_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--classes', type=int, default=100, help='class folders')
    parser.add_argument('--per-class', type=int, default=500, help='files per class folder')
    parser.add_argument('--repeats', type=int, default=3, help='timed scans of each, alternating')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for c in range(args.classes):
            folder = Path(root) / f'c{c:04d}'
            folder.mkdir()
            for i in range(args.per_class):
                (folder / f'{i}.jpg').touch()
        _, class_to_idx = find_classes(root)
        for repeat in range(args.repeats):
            start = time.perf_counter()
            theirs = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
            middle = time.perf_counter()
            ours = image_folder.SafeImageFolder.make_dataset(None, root, class_to_idx)
            end = time.perf_counter()
            print(f'scan {repeat}: torchvision {middle - start:.3f} s, ours {end - middle:.3f} s, '
                  f'ratio {(end - middle) / (middle - start):.2f}, {len(ours)} files, same list: {ours == theirs}')


if __name__ == '__main__':
    main()
