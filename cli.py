"""What every script's command line shares: ``run_main`` (one ``error:`` line, exit status 2), the
flags several scripts take, and the checks they all run.

Import it before NNI in a script: it imports ``nni_patches``, whose warning filters must precede
NNI's imports, and ``run_main`` refuses an NNI other than the one patched. Each script parses with
:func:`parse_checked`; a flag value outside its rule (one table, :data:`RULES`) is refused before a
dataset or a weights file is read. Neither imports torch, NNI, timm or Lightning (only a CUDA ``--latency-device``
asks torch how many GPUs it sees): a script imports them once its flags are checked, so --help and a flag error
answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import nni_patches  # first: its warning filters must be in place before NNI is imported
import folders
from arch import (EXTREMES, PRESETS, SEARCHED, SpaceError, complete_space_kwargs, is_number, make_arch, preset_space,
                  searched_arch)
from recipes import choose_recipe, describe_recipes
from utils import PRECISIONS, SCHEDULES, UserError, is_first_process

T = TypeVar('T')


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's ``main``: a :class:`UserError` or :class:`SpaceError` becomes one line on stderr and
    exit status 2, a Ctrl-C that ``main`` does not handle itself one line and exit status 130."""
    try:
        nni_patches.check_nni_version()
        main()
    except (UserError, SpaceError) as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        print(str(stop) or 'interrupted', file=sys.stderr)
        sys.exit(getattr(stop, 'code', 130))


Rule = Callable[[Any], 'str | None']


def at_least(low: int) -> Rule:
    return lambda value: None if value >= low else f'must be at least {low}'


def between(low: int, high: int) -> Rule:
    """Counts whose huge values would start millions of processes or allocate terabytes are capped too."""
    return lambda value: None if low <= value <= high else f'must be between {low} and {high}'


def number(low: float = 0.0, high: float = math.inf, high_open: bool = False) -> Rule:
    """A finite number in [low, high] (or [low, high)); NaN fails every comparison and is refused too."""
    def rule(value: float) -> str | None:
        inside = low <= value and (value < high if high_open else value <= high)
        if inside and math.isfinite(value):
            return None
        upper = '' if high == math.inf else f' and {"below" if high_open else "at most"} {high:g}'
        return f'must be a finite number of {low:g} or more{upper}'
    return rule


# The devices this project runs on, as torch.device spells them (cuda:N: the GPU of that index).
DEVICE = re.compile(r'(cpu|cuda|mps)(:(0|[1-9][0-9]*))?')


def device(value: str) -> str | None:
    return None if DEVICE.fullmatch(value) else 'is not a device this runs on: use cpu, cuda or cuda:N'


def present_device(value: str) -> str | None:
    """A device that exists here: a figure measured elsewhere (the CPU instead of a GPU) would be wrong."""
    problem = device(value)
    if problem or not value.startswith('cuda'):
        return problem
    import torch  # here: only a CUDA device given needs it
    index = int(value.partition(':')[2] or 0)
    if index >= torch.cuda.device_count():
        return f'needs CUDA GPU {index}, and {torch.cuda.device_count()} are visible: measure where the GPU is'
    return None


PROBABILITY = number(0.0, 1.0)
CORES = max(os.cpu_count() or 1, 2)
RULES: dict[str, Rule] = {
    # data and hardware
    # one process per core at most: a thousand DDP ranks or loader workers on a laptop exhaust its memory
    'batch_size': between(1, 1_000_000), 'num_workers': between(0, 2 * CORES), 'img_size': between(1, 1024),
    'conv_stem': between(0, 4096),
    'gpus': at_least(0), 'cpu_processes': between(1, CORES), 'num_nodes': between(1, 100_000),
    'concurrency': between(1, 1024),
    'device': device,
    'seed': between(0, 2 ** 32 - 1), 'port': between(1, 65535),
    # training recipe
    'epochs': at_least(1), 'warmup': at_least(0), 'learning_rate': number(), 'min_lr': number(),
    'warmup_lr': number(), 'weight_decay': number(), 'smoothing': number(0.0, 1.0, high_open=True),
    'mixup': number(), 'cutmix': number(), 'drop_path': number(0.0, 1.0, high_open=True),
    'clip_grad': number(), 'ema_decay': number(0.0, 1.0, high_open=True),
    # search
    'trials': at_least(1), 'generations': at_least(1), 'population': at_least(1), 'select': at_least(1),
    'mutation_num': at_least(0), 'crossover_num': at_least(0), 'evolution_population_size': at_least(1),
    'evolution_sample_size': at_least(1), 'search_images': at_least(1), 'latency_batch_size': between(1, 4096),
    'mutation_prob': PROBABILITY, 'param_mutation_prob': PROBABILITY, 'evolution_mutation_prob': PROBABILITY,
    'min_params': number(), 'max_params': number(), 'max_flops': number(), 'max_latency': number(),
    'latency_device': present_device,
    # study
    'subnets': between(2, 100_000), 'finetune_subnets': between(2, 100_000), 'seeds': between(1, 1000),
    'finetune_epochs': at_least(1), 'retrain_epochs': at_least(1), 'control_draws': between(1, 1000),
    'test_images': at_least(10),
}


# Paths and JSON given as an empty string would be dropped or fall back to a default silently.
NOT_EMPTY = ('output', 'arch', 'weights', 'datapath', 'input', 'subnet_output', 'machines', 'experiment_dir', 'export',
             'space_file')


def check_flags(args: argparse.Namespace) -> None:
    """Refuse the first flag whose value breaks its rule (unset flags, None, are not checked)."""
    datapath = getattr(args, 'datapath', None)
    if datapath and not Path(datapath).expanduser().exists():
        raise UserError(f'--datapath {datapath} does not exist: give the folder of the dataset')
    for name in NOT_EMPTY:
        if getattr(args, name, None) is not None and not str(getattr(args, name)).strip():
            raise UserError(f'--{name.replace("_", "-")} is empty: give a value or leave the flag out')
    for name, rule in RULES.items():
        value = getattr(args, name, None)
        problem = rule(value) if value is not None else None
        if problem:
            raise UserError(f'--{name.replace("_", "-")} {problem}, got {value}')
    low, high = getattr(args, 'min_params', None), getattr(args, 'max_params', None)
    if low is not None and high is not None and low > high:
        raise UserError(f'--min-params {low} > --max-params {high}: no arch can meet it')
    if (getattr(args, 'mixup', None) or getattr(args, 'cutmix', None)) and args.batch_size % 2:
        raise UserError(f'--batch-size {args.batch_size} is odd: Mixup/CutMix pair images, so use an even batch size '
                        '(or --mixup 0 --cutmix 0)')


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` followed by :func:`check_flags`."""
    args = parser.parse_args(argv)
    check_flags(args)
    return args


# --------------------------------------------------------------------------------------------
# Flags several scripts share
# --------------------------------------------------------------------------------------------

def add_name_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """``--name``: a preset search space (``text`` is its help), and ``--space-file``: an official YAML."""
    parser.add_argument('--name', choices=list(PRESETS), default=None, help=text)
    parser.add_argument('--space-file', default=None,
                        help="an official AutoFormer YAML (SUPERNET: / SEARCH_SPACE:) as the space's choices; "
                             "the rest (input size, patch, classes) from --name's preset")


def space_arg(args: argparse.Namespace) -> str | dict[str, Any] | None:
    """What names the space: ``--space-file``'s constructor keywords, else the preset ``--name``."""
    return read_space_file(args.space_file, args.name) if getattr(args, 'space_file', None) else args.name


def space_kwargs_of(space: str | Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords of a :func:`space_arg`: the file's, or the preset's."""
    return dict(space) if isinstance(space, Mapping) else preset_space(space)


def add_arch_arg(parser: argparse.ArgumentParser, doing: str, note: str = '') -> None:
    """``--arch`` of the training scripts: ``doing`` (train that one subnet), writing ``<output>/subnet.pth``."""
    parser.add_argument('--arch', default=None,
                        help=f'{doing} and write <output>/subnet.pth: an arch JSON (text or file), '
                             f"a search's best.json, an official RETRAIN: YAML, autoformer-tiny|small|base, or the "
                             f"space's smallest|largest{note}")


# The official YAML keys and the constructor keywords they give.
OFFICIAL_KEYS = {'EMBED_DIM': 'search_embed_dim', 'MLP_RATIO': 'search_mlp_ratio', 'NUM_HEADS': 'search_num_heads',
                 'DEPTH': 'search_depth'}


def read_yaml(path: str, what: str) -> dict[str, Any]:
    """A YAML file given on the command line, refused in one line when it is missing or not a mapping."""
    import yaml
    if not Path(path).is_file():
        raise UserError(f'{what}: {path} is not a file')
    try:
        content = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f'{what}: {path} is not YAML ({type(err).__name__}: {str(err).splitlines()[0]})') from None
    if not isinstance(content, dict):
        raise UserError(f'{what}: {path} holds a {type(content).__name__}, not the sections of an official file')
    return content


def read_space_file(path: str, name: str | None = None) -> dict[str, Any]:
    """Constructor keywords from an official AutoFormer YAML: ``SEARCH_SPACE:``'s choices exactly, over the
    preset ``name`` (input size, patch size, classes; default: the official 224 px, patch 16, 1000 classes).
    ``SUPERNET:`` gives the official supernet's sizes: each must hold the largest choice. A wider official
    supernet (supernet-T's embed dim 256 against choices up to 240) trains weights no choice uses; here the
    supernet is as wide as the largest choice, and a wider official checkpoint is sliced to it."""
    content = read_yaml(path, '--space-file')
    choices = content.get('SEARCH_SPACE')
    if not isinstance(choices, dict) or set(OFFICIAL_KEYS) - set(choices):
        raise UserError(f'--space-file {path}: no SEARCH_SPACE: section with {", ".join(OFFICIAL_KEYS)} (the '
                        'official format: experiments/supernet/supernet-T.yaml)')
    space = {key: _official_values(choices[official], f'--space-file {path}: {official}')
             for official, key in OFFICIAL_KEYS.items()}
    space['search_mlp_ratio'] = tuple(float(ratio) for ratio in space['search_mlp_ratio'])
    supernet = content.get('SUPERNET') or {}
    for official, key in OFFICIAL_KEYS.items():
        size = supernet.get(official) if isinstance(supernet, dict) else None
        if size is not None and not (is_number(size) and size >= max(space[key])):
            raise UserError(f'--space-file {path}: SUPERNET: {official} {size!r} is smaller than the largest '
                            f'choice {max(space[key])} of SEARCH_SPACE:')
    try:
        return complete_space_kwargs(**{**(preset_space(name) if name else {}), **space})
    except SpaceError as err:
        raise UserError(f'--space-file {path}: {err}') from None


def read_retrain_arch(path: str) -> dict[str, Any]:
    """The subnet of an official ``RETRAIN:`` section (AutoFormer-T.yaml) as an arch."""
    retrain = read_yaml(path, '--arch').get('RETRAIN')
    if not isinstance(retrain, dict) or set(OFFICIAL_KEYS) - set(retrain):
        raise UserError(f'--arch {path}: no RETRAIN: section with {", ".join(OFFICIAL_KEYS)} (the official '
                        'format: experiments/subnet/AutoFormer-T.yaml)')
    ratios = _official_values(retrain['MLP_RATIO'], f'--arch {path}: RETRAIN: MLP_RATIO')
    heads = _official_values(retrain['NUM_HEADS'], f'--arch {path}: RETRAIN: NUM_HEADS')
    if not (retrain['DEPTH'] == len(ratios) == len(heads) and is_number(retrain['EMBED_DIM'])):
        raise UserError(f'--arch {path}: RETRAIN: has DEPTH {retrain["DEPTH"]!r} but {len(ratios)} MLP ratios and '
                        f'{len(heads)} head counts')
    return make_arch(retrain['EMBED_DIM'], [float(ratio) for ratio in ratios], heads)


def _official_values(values: Any, what: str) -> tuple:
    if not isinstance(values, list) or not values or not all(is_number(v) and v > 0 for v in values):
        raise UserError(f'{what} must be a list of positive numbers, got {values!r}')
    return tuple(values)


def add_data_args(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """The data flags every script shares, with the same names and meaning."""
    parser.add_argument('--dataset', choices=folders.DATASETS, default=None,
                        help=f"default: cifar10 when --datapath holds {folders.CIFAR_DIR}/ (or is it), imagenet for "
                             'any other --datapath, the bundled digits without --datapath; fashion-mnist reads '
                             f'--datapath, else {folders.FASHION_SYSTEM_PATH} (Debian: apt-get install '
                             'dataset-fashion-mnist)')
    parser.add_argument('--datapath', default=None, help='dataset folder (not needed for digits)')
    parser.add_argument('--batch-size', '--batch_size', dest='batch_size', type=int, default=batch_size,
                        help=f'images per batch (default {batch_size})')
    parser.add_argument('--num-workers', '--num_workers', dest='num_workers', type=int,
                        default=min(8, os.cpu_count() or 1), help='data loading processes')


def recipe_parser(argv: list[str] | None, recipes: Mapping[str, dict[str, Any]], script: str, description: str | None,
                  retrain: Mapping[str, dict[str, Any]] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """A training script's parser (its ``dataset`` default the one the command line names) and the recipe (the
    flags' defaults, with ``output`` = ``outputs/<script>-<dataset>``; with ``--arch``, ``retrain``'s values over
    them). ``--dataset`` / ``--datapath`` / ``--recipe`` / ``--arch`` are read first; without ``--recipe`` the recipe
    is chosen from the data (and printed)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--dataset', choices=folders.DATASETS, default=None)  # an unknown one refused before it is used
    for flag in ('--datapath', '--recipe', '--arch'):
        pre.add_argument(flag, default=None)
    known = pre.parse_known_args(argv)[0]
    dataset = folders.dataset_name(known.dataset, known.datapath)
    if known.recipe in recipes:
        name, why = known.recipe, 'asked for with --recipe'
    else:  # an unknown name is refused by the full parser's choices
        name, why = choose_recipe(dataset, known.datapath)
    retrained = (retrain or {}).get(name, {}) if known.arch is not None else {}
    recipe = {**recipes[name], **retrained, 'output': f'outputs/{script}-{dataset}'}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=describe_recipes(recipes, name, why))
    add_data_args(parser, batch_size=recipe['batch_size'])
    parser.add_argument('--recipe', choices=list(recipes), default=name,
                        help='the training recipe: the defaults of the flags below (chosen from the data when not '
                             'given; each listed at the end)')
    parser.set_defaults(base_lr=recipe['base_lr'], recipe_reason=why, dataset=dataset)
    return parser, recipe


def check_recipe(args: argparse.Namespace) -> None:
    """Refuse a schedule that never leaves its warmup, and say which recipe and learning rate the run gets."""
    if args.warmup >= args.epochs:
        raise UserError(f'--warmup {args.warmup} is as long as the run or longer (--epochs {args.epochs}): the '
                        'learning rate would never leave the warmup; lower --warmup')
    rate = (f'--learning-rate {args.learning_rate:g}' if args.learning_rate is not None else
            f'learning rate {args.base_lr:g} x global batch / 512 ({args.base_lr * args.batch_size / 512:g} at batch '
            f'{args.batch_size} on one process)')
    if is_first_process():  # once, not per DDP rank
        print(f'recipe {args.recipe} ({args.recipe_reason}): {args.epochs} epochs, warmup {args.warmup}, {rate}',
              flush=True)


def add_device_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """``--device``: one device, the same value type in every script (checked by :data:`RULES`)."""
    parser.add_argument('--device', default=None, metavar='DEVICE',
                        help=f'{text}: cpu, cuda or cuda:N (default: CUDA when present)')


def add_gpus_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """``--gpus``: GPUs per machine, the same default in every script."""
    parser.add_argument('--gpus', type=int, default=None,
                        help=f'{text} (default: 1 when CUDA is present, else none: the CPU; 0 chooses the CPU)')


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (Lightning's names) and ``--tf32``, the same in every script."""
    parser.add_argument('--precision', default=None, choices=PRECISIONS,
                        help='numeric precision (default: bf16-mixed on CUDA GPUs that have bf16, else 16-mixed, '
                             'as the official AMP; 32-true on the CPU, where bf16-mixed runs slower)')
    parser.add_argument('--tf32', action='store_true',
                        help='TF32 tensor cores for fp32 matmuls on CUDA (faster, about 1e-3 relative error)')


def add_training_args(parser: argparse.ArgumentParser, recipe: Mapping[str, Any]) -> None:
    """Training flags with the recipe's defaults (the paper's for ImageNet); seed spellings accepted."""
    def flag(name: str, *aliases: str, **kwargs: Any) -> None:
        dest = name.lstrip('-').replace('-', '_')
        spellings = [name, *aliases, '--' + dest]
        parser.add_argument(*dict.fromkeys(spellings), dest=dest, default=recipe.get(dest), **kwargs)

    flag('--epochs', type=int, help='training epochs (default: %(default)s)')
    flag('--warmup', '--warmup-epochs', type=int, help='linear warmup epochs (default: %(default)s)')
    flag('--schedule', choices=SCHEDULES,
         help="learning-rate schedule (default: %(default)s). epoch: the official one, timm's cosine stepped once an "
              'epoch with the warmup counted in --epochs (epoch e trains at its value for e-1, as the official '
              'loop steps it after each epoch); step: warmup then cosine over the epochs after it, '
              "updated every step (the small datasets' recipes: their runs last a few epochs)")
    flag('--learning-rate', '--lr', type=float,
         help=f"peak learning rate, as given (default: the recipe's base_lr {recipe['base_lr']:g} x global batch / "
              '512, the official rule)')
    flag('--min-lr', type=float, help='final learning rate of the cosine schedule')
    flag('--warmup-lr', type=float, help='learning rate at the start of the warmup')
    flag('--weight-decay', type=float, help='AdamW weight decay (none on norms, biases, class token, '
         'absolute position embedding)')
    flag('--smoothing', type=float, help='label smoothing')
    flag('--mixup', type=float, help='Mixup alpha (0 turns it off)')
    flag('--cutmix', type=float, help='CutMix alpha (0 turns it off)')
    flag('--drop-path', type=float, help='drop path rate of the deepest layer')
    flag('--clip-grad', type=float, help='gradient norm clipping (default: off)')
    flag('--ema-decay', type=float, help='EMA of the supernet weights with this decay (default 0: off)')
    flag('--img-size', type=int, help="input size (default: the space's)")
    parser.add_argument('--no-repeated-aug', dest='repeated_aug', action='store_false',
                        help='under DDP, read each training image once an epoch instead of 3 times across the '
                             "processes (the official run's repeated augmentation)")
    parser.add_argument('--balanced-sampling', action=argparse.BooleanOptionalAction, default=None,
                        help='draw each class equally often (with replacement); default: on when the largest class '
                             'holds 3x the images of the smallest or more. Validation reports balanced accuracy '
                             '(val_balanced_*) either way')
    parser.add_argument('--skip-unsampled', action=argparse.BooleanOptionalAction,
                        default=recipe.get('skip_unsampled', False),
                        help="AdamW skips the layers a step's arch does not use (their gradients are None); without "
                             'it, as in the official run, a layer used once keeps a zero gradient, so every step '
                             "decays it and moves it by momentum, sampled or not (default: the recipe's, %(default)s)")
    parser.add_argument('--no-rel-pos-decay', dest='rel_pos_decay', action='store_false',
                        help='exempt the relative-position tables from weight decay (the official run decays '
                             "them: its exempt list's 'rel_pos_embed' matched no parameter name)")
    add_gpus_arg(parser, 'GPUs per machine (Lightning DDP when more than one)')
    parser.add_argument('--cpu-processes', type=int, default=1,
                        help='DDP processes on the CPU when there is no GPU (gloo)')
    parser.add_argument('--num-nodes', '--num_nodes', dest='num_nodes', type=int, default=1,
                        help='machines (launched with torchrun or SLURM)')
    add_precision_args(parser)
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the training: the subnet of --arch, or the supernet as one graph for '
                             'every arch (masked_supernet.py: the same results at the largest arch\'s arithmetic); '
                             'for GPUs, where a step waits on Python and kernel launches, not on a CPU')
    parser.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    parser.add_argument('--seed', type=int, default=0, help='random seed (data order, architectures, init)')
    parser.add_argument('--output', default=recipe.get('output'), metavar='FOLDER',
                        help='folder for checkpoints, logs and weights')


def load_json_arg(value: str, what: str = '--arch') -> Any:
    """Parse a JSON string or the path of a JSON file, with a clear message when it is neither."""
    text = value
    if not value.lstrip().startswith('{'):
        path = Path(value)
        if not path.is_file():
            raise UserError(f'{what}: {value} is neither JSON text nor an existing file')
        try:
            text = path.read_text(encoding='utf-8')
        except UnicodeDecodeError as err:
            raise UserError(f'{what}: {value} is not UTF-8 text ({err.reason} at byte {err.start}): '
                            'save the JSON file as UTF-8') from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f'{what}: malformed JSON ({err})') from None
    except RecursionError:
        raise UserError(f'{what}: the JSON is nested too deeply to be an arch') from None
    except ValueError as err:  # e.g. an integer of thousands of digits
        raise UserError(f'{what}: unusable JSON ({err})') from None


def load_arch_arg(value: str) -> Any:
    """``--arch``: an arch as JSON text or a file, a record holding one under ``arch`` (a search's
    ``best.json``, an entry of its ``candidates.json``), an official ``RETRAIN:`` YAML, the name of
    a released model (``autoformer-tiny|small|base``), or ``smallest|largest`` (of the space)."""
    if value in (f'autoformer-{size}' for size in SEARCHED):
        return searched_arch(value)
    if value in EXTREMES:  # resolved against the space once it is known (space.complete_arch)
        return value
    if value.lower().endswith(('.yaml', '.yml')):
        return read_retrain_arch(value)
    arch = load_json_arg(value, '--arch')
    if isinstance(arch, dict) and 'arch' in arch:
        if not isinstance(arch['arch'], dict):
            raise UserError(f"--arch: the record's arch is {arch['arch']!r}, not an arch (a JSON object of labels)")
        return arch['arch']
    return arch


def from_flags(settings: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A library's settings dataclass built from the flags of the same names (``values`` win): the one place
    where a script's Namespace turns into what the library takes."""
    return settings(**{field.name: values[field.name] if field.name in values else getattr(args, field.name)
                       for field in dataclasses.fields(settings)})
