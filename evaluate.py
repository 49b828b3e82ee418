"""Evaluate a pre-searched AutoFormer, or any arch of a supernet: top-1, top-5, params, FLOPs.

    python evaluate.py --datapath path/to/imagenet/val --name tiny --weights path/to/weights.pth
    python evaluate.py --dataset digits --weights outputs/demo/supernet.pth --arch best.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cli import (add_data_args, add_device_arg, add_name_arg, add_precision_args, load_arch_arg, parse_checked,
                 run_main, space_arg)
import folders
from plots import plot_confusion
from arch import count_flops, count_params
from utils import UserError, atomic_write_json

if TYPE_CHECKING:
    import torch


MAX_PRINTED_CLASSES = 20  # more (ImageNet's 1000) only in results.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_name_arg(parser, 'preset; default: the space stored with --weights, else tiny')
    parser.add_argument('--weights', default='nni',
                        help="subnet weights, or a supernet weights file (with --arch); 'nni' downloads "
                             "NNI's AutoFormer-T/S/B (default); 'none' evaluates random weights")
    parser.add_argument('--arch', default=None,
                        help="arch to slice from a supernet: JSON text or a JSON file, also a search's best.json, "
                             "or the space's smallest|largest")
    add_data_args(parser)
    parser.add_argument('--split', choices=folders.SPLITS, default='test',
                        help="split to evaluate (ImageNet's test is its val folder)")
    add_device_arg(parser, 'device to evaluate on')
    add_precision_args(parser)
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the subnet before evaluating (compiled once: worth it for a large '
                             'evaluation on a GPU; training and search change the arch and stay eager)')
    parser.add_argument('--output', default=None, metavar='FOLDER',
                        help='also write the results to FOLDER/results.json and the confusion matrix to '
                             'FOLDER/confusion.png')
    parser.add_argument('--export', action='store_true',
                        help='also export the subnet into --output/export (TorchScript, ONNX and a JSON of its '
                             'classes and preprocessing); without --dataset or --datapath it only exports')
    args = parse_checked(parser, argv)
    if args.export and not args.output:
        raise UserError('--export writes into --output/export: give --output FOLDER')
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # after the flags: --help and a flag error answer before torch loads (startup time)
    import torch
    import data
    import samplers
    from devices import pick_device, set_up_precision
    from engine import evaluate
    from space import load_model
    arch = load_arch_arg(args.arch) if args.arch else None
    weights = None if args.weights == 'none' else args.weights
    model, arch, space_kwargs, described = load_model(weights, space_arg(args), arch)
    if args.export and args.dataset is None and args.datapath is None:
        return export_only(model, arch, space_kwargs, described, args)
    args.dataset = folders.dataset_name(args.dataset, args.datapath)
    dataset = data.build_dataset(args.dataset, args.datapath, args.split, space_kwargs['img_size'])
    data.check_classes(args.dataset, len(dataset.classes), space_kwargs)
    loader = samplers.build_loader(dataset, args.batch_size, args.num_workers)
    device = pick_device(args.device)
    precision = set_up_precision(args.precision, args.tf32, device.type == 'cuda', 'evaluating')
    if args.compile:
        model = torch.compile(model)
    metrics = evaluate(model, loader, device, precision=precision)
    read = data.split_read(args.dataset, args.datapath, args.split)
    if read != args.split:
        print(f'--split {args.split}: {args.dataset} has no {args.split} split of its own here; evaluating on {read}')
    results = {'weights': args.weights, 'dataset': args.dataset, 'split': read, 'arch': arch,
               'params': count_params(arch, **space_kwargs), 'flops': count_flops(arch, **space_kwargs),
               'classes': list(dataset.classes), **metrics}
    optimistic = data.optimism((described or {}).get('trained_on'), args.dataset, args.datapath, args.split)
    if optimistic:
        results['optimistic'] = optimistic
    print(describe(results))
    if args.output:
        atomic_write_json(results, Path(args.output) / 'results.json')
        plot_confusion(results['confusion'], results['classes'], Path(args.output) / 'confusion.png',
                       f"{args.dataset} {read}: top-1 {results['top1']:.2f}, balanced {results['balanced']:.2f}")
    if args.export:
        described = described or data.description(args.dataset, args.datapath, space_kwargs['img_size'],
                                                  dataset.classes)
        export(model._orig_mod if args.compile else model, results, space_kwargs, described, args.output)
    return results


def export_only(model: torch.nn.Module, arch: dict, space_kwargs: dict, described: dict | None,
                args: argparse.Namespace) -> dict:
    """``--export`` without data: the subnet's files, its classes and preprocessing from the weights file."""
    if described is None:
        raise UserError(f'{args.weights} does not say which classes and preprocessing it was trained with (a file '
                        'from elsewhere): give --dataset / --datapath, and the export records those of the data')
    info = {'weights': args.weights, 'arch': arch, 'params': count_params(arch, **space_kwargs),
            'flops': count_flops(arch, **space_kwargs)}
    print('--export without --dataset or --datapath: exporting only (no evaluation)')
    export(model, info, space_kwargs, described, args.output)
    return info


def export(model: torch.nn.Module, info: dict, space_kwargs: dict, described: dict, output: str) -> None:
    from checkpoints import export_standalone  # here, after the flags: as main's imports (startup time)
    files = export_standalone(model, info, space_kwargs, Path(output) / 'export', described)
    print(f"exported {files['torchscript']} and {files['onnx']}, described in {files['info']}")


def describe(results: dict) -> str:
    """The printed summary: top-1, balanced accuracy, top-5 where it means something, cost, per-class accuracy."""
    top5 = f"  top-5 {results['top5']:.2f}" if results['top5'] is not None else ''
    per_class = ', '.join(f'{name} {accuracy:.1f}' for name, accuracy in zip(results['classes'], results['per_class'])
                          if accuracy is not None) if len(results['classes']) <= MAX_PRINTED_CLASSES else 'in --output'
    return (f"top-1 {results['top1']:.2f}  balanced {results['balanced']:.2f}{top5}  params "
            f"{results['params'] / 1e6:.2f}M  FLOPs {results['flops'] / 1e9:.3f}G  {results['images']} images  "
            f"{results['images_per_s']:.1f} images/s"
            + (f"  ({results['skipped']} undecodable images left out)" if results['skipped'] else '')
            + f'\nper-class top-1: {per_class}'
            + (f"\nwarning: {results['optimistic']}" if results.get('optimistic') else ''))


if __name__ == '__main__':
    run_main(main)
