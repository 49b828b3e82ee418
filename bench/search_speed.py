"""Seconds per candidate of a search of the tiny space: each candidate evaluated on a cached split, as search.py does.

    python bench/search_speed.py --device cuda --images 10000 --candidates 20      # the GPU check
    python bench/search_speed.py --images 64 --img-size 64 --candidates 2         # on a CPU: checks the command

Times ``candidates.CandidateEvaluator.evaluate`` (the trial of every engine: evaluation and record) over random
archs of the tiny space, with the frozen subnet of each (search.py's default) and with the one compiled graph
of ``search.py --compile``, and projects 1,000 candidates. The supernet's weights and the split's images are
random: the ranking means nothing, the time is the real one. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import candidates  # noqa: E402
import search_data  # noqa: E402
from checkpoints import save_weights  # noqa: E402
from common import positive_int, preset_space  # noqa: E402
from arch import sample_arch  # noqa: E402
from space import build_supernet  # noqa: E402
from utils import PRECISIONS  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', default='tiny', help='preset')
    parser.add_argument('--img-size', type=positive_int, default=None, help="input size (default: the preset's)")
    parser.add_argument('--images', type=positive_int, default=10000, help='images in the search split')
    parser.add_argument('--candidates', type=positive_int, default=20, help='timed candidates of each way')
    parser.add_argument('--warmup', type=int, default=2, help='untimed candidates of each way first (compiling)')
    parser.add_argument('--batch-size', type=positive_int, default=256, help="images per batch (search.py's default)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu or cuda')
    parser.add_argument('--precision', choices=PRECISIONS, default=None,
                        help='default: mixed on CUDA, fp32 on the CPU (as search.py)')
    return parser.parse_args()


def random_split(path: Path, images: int, size: int, classes: int) -> search_data.CachedSplit:
    """A cache file as ``search_data.write_cache`` writes it, of random uint8 images."""
    generator = torch.Generator().manual_seed(0)
    torch.save({'images': torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator),
                'labels': torch.randint(0, classes, (images,), generator=generator),
                'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}, path)
    return search_data.CachedSplit(path)


def seconds_per_candidate(evaluate_one, archs: list[dict], warmup: int) -> float:
    for arch in archs[:warmup]:
        evaluate_one(arch)
    start = time.perf_counter()
    for arch in archs[warmup:]:
        evaluate_one(arch)
    return (time.perf_counter() - start) / (len(archs) - warmup)


def main() -> None:
    args = parse_args()
    space_kwargs = preset_space(args)
    device = torch.device(args.device)
    rng = random.Random(0)
    archs = [sample_arch(space_kwargs, rng) for _ in range(args.warmup + args.candidates)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / 'supernet.pth'
        state_dict = build_supernet(space_kwargs).state_dict()
        save_weights(weights, state_dict, space_kwargs)
        split = random_split(folder / 'split.pt', args.images, space_kwargs['img_size'], space_kwargs['num_labels'])
        figures = {}
        for way, compile in (('frozen subnet per candidate', False), ('one compiled graph (--compile)', True)):
            evaluator = candidates.CandidateEvaluator(state_dict, space_kwargs, split, folder / way.split()[0],
                                                      args.batch_size, device, args.precision, compile=compile)
            figures[way] = seconds_per_candidate(lambda arch: evaluator.evaluate(arch, lambda value: None), archs,
                                                 args.warmup)
    label = (f'search_speed {args.name} {space_kwargs["img_size"]}px, {args.images} images, batch {args.batch_size}, '
             f'{args.device} {args.precision or "default precision"}')
    print(f'{label}: ' + '; '.join(f'{way} {seconds:.3f} s per candidate, 1,000 candidates in '
                                   f'{1000 * seconds / 60:.1f} min' for way, seconds in figures.items()))


if __name__ == '__main__':
    main()
