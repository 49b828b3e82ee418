"""Bad input in every script ends in one ``error:`` line and exit status 2 within 60 s: never a
traceback, a hang or a result. One table, ``bad_input_cases.txt``: the script, its flags,
the message expected."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import convert
import demo
import evaluate
import finetune
import scratch
import search
import study
from cli import run_main
from fixtures import within, write_cifar10, write_image_folder
from checkpoints import save_weights
from arch import complete_space_kwargs, make_arch
from space import AutoformerSpace, build_supernet

ROOT = Path(__file__).parent.parent
SCRIPTS = {'evaluate': evaluate, 'scratch': scratch, 'finetune': finetune, 'search': search, 'demo': demo,
           'convert': convert, 'study': study}
DEMO_ARCH = make_arch(96, [3.0, 3.0], [1, 1])
LAUNCHER_VARIABLES = ('TORCHELASTIC_RUN_ID', 'GROUP_RANK', 'SLURM_NTASKS', 'NODE_RANK', 'MASTER_ADDR')


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
    """A demo supernet with random weights, damaged copies of it, odd arch files and small datasets."""
    root = tmp_path_factory.mktemp('bad-input')
    space = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    state = build_supernet(space).state_dict()
    paths = {'weights': root / 'supernet.pth'}
    save_weights(paths['weights'], state, space)

    def damaged(name: str, tensors: dict | None = None, **space_changes) -> None:
        checkpoint = {'space': {**json.loads(json.dumps(space)), **space_changes}, 'state_dict': tensors or state}
        if space_changes.get('space_is_text'):
            checkpoint['space'] = 'demo'
        torch.save(checkpoint, root / f'{name}.pth')
        paths[name] = root / f'{name}.pth'

    damaged('space-text', space_is_text=True)
    damaged('space-negative', img_size=-32)
    damaged('space-patch-0', patch_size=0)
    first = next(iter(state))
    damaged('sparse', {**state, first: state[first].to_sparse()})
    damaged('meta', {**state, first: torch.empty_like(state[first], device='meta')})
    damaged('int64', {k: v.round().long() for k, v in state.items()})
    damaged('complex', {k: v.to(torch.complex64) for k, v in state.items()})

    paths['nested.json'] = root / 'nested.json'
    paths['nested.json'].write_text('[' * 100_000 + ']' * 100_000)
    paths['latin1.json'] = root / 'latin1.json'
    paths['latin1.json'].write_bytes(json.dumps({'arch': DEMO_ARCH, 'note': 'café'}, ensure_ascii=False)
                                     .encode('latin-1'))
    paths['small-folder'] = write_image_folder(root / 'small', ['a', 'b'], 3)
    paths['cifar-100'] = write_cifar10(root / 'cifar', n_train_per_batch=20, n_test=10).parent
    paths['supernet-T.yaml'] = ROOT / 'tests' / 'official-spaces' / 'supernet-T.yaml'
    paths['empty'] = root / 'empty'
    paths['empty'].mkdir()
    paths['converted'] = root / 'converted.pth'
    paths['converted'].write_bytes(b'an earlier result')
    archs = {'float-arch': json.dumps({**DEMO_ARCH, 'embed_dim': 96.0}),
             'unknown-label-arch': json.dumps({**DEMO_ARCH, 'embed_dims': 112})}  # a typo: ignored, 96 would run
    return {**{name: str(path) for name, path in paths.items()}, **archs}


def read_cases(path: Path) -> list[tuple[str, str, str]]:
    """``(script, flags, message)`` from the lines ``script | flags | message`` of ``path`` (# starts a comment)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith('#')]
    return [tuple(part.strip() for part in line.split(' | ')) for line in lines]


CASES = read_cases(Path(__file__).parent / 'bad_input_cases.txt')
if not torch.cuda.is_available():  # with a GPU, measuring latency on it is right
    CASES.append(('search', '--weights {weights} --latency-device cuda', '--latency-device needs CUDA GPU 0'))


def run_script(script: str, flags: str, files: dict[str, str]) -> tuple[int, float]:
    """Run a script's main as its command line does; return the exit status and the seconds taken."""
    argv = [files.get(arg[1:-1], arg) if arg.startswith('{') else arg for arg in split_flags(flags)]
    start = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        within(60, lambda: run_main(lambda: SCRIPTS[script].main(argv)))
    return exited.value.code, time.monotonic() - start


def split_flags(flags: str) -> list[str]:
    """Flags split on spaces, with a JSON object kept whole."""
    head, brace, tail = flags.partition('{"')
    return shlex.split(head) + ([brace + tail] if brace else [])


@pytest.mark.parametrize('script, flags, message', CASES, ids=[f'{s} {f[:60]}' for s, f, _ in CASES])
def test_bad_input_ends_in_one_error_line_and_exit_2(files, tmp_path, capsys, monkeypatch, script, flags, message):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    files = {**files, 'out': str(tmp_path / 'out')}  # each case its own: a run left by another cannot answer
    status, seconds = run_script(script, flags, files)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert 'Traceback' not in err and seconds < 60
    assert not (Path(files['out']) / 'supernet.pth').exists()
    assert Path(files['converted']).read_bytes() == b'an earlier result'


@pytest.mark.parametrize('command', [
    ['scratch.py', '--num-nodes', '2', '--output', '{out}'],                       # used to wait forever
    ['evaluate.py', '--weights', '{weights}', '--arch', '{nested.json}'],           # used to be a traceback
])
def test_the_command_line_itself_exits_2_with_one_line(files, tmp_path, command):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    files = {**files, 'out': str(tmp_path / 'out')}
    argv = [files[arg[1:-1]] if arg.startswith('{') else arg for arg in command]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert [line.startswith('error: ') for line in result.stderr.splitlines()].count(True) == 1, result.stderr


def test_damaged_files_in_an_output_folder_end_in_one_line(files, tmp_path):
    """A hand-edited or damaged run.json / experiment.json / candidate record: one line naming the file."""
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'last.ckpt').write_bytes(b'a run')
    for content in ('{bad', '[1]'):
        (tmp_path / 'run.json').write_text(content)
        status, _ = run_script('scratch', f'--resume --output {tmp_path}', files)
        assert status == 2
    search_output = tmp_path / 'search'
    search_output.mkdir()
    (search_output / 'experiment.json').write_text('{bad')
    status, _ = run_script('search', f'--weights {files["weights"]} --engine sequential --output {search_output}',
                           files)
    assert status == 2
