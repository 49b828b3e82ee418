"""One meaning per flag name: every script's parser against the README's flag table (the spec); --help and a flag
error answer before the heavy libraries load."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # make test-fast

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ('evaluate', 'search', 'scratch', 'finetune', 'convert', 'demo', 'study')
# One parser builder (cli.add_training_args): the recipe flags of these two agree by construction.
TRAINING_PAIR = {'scratch', 'finetune'}


class Captured(Exception):
    """Carries a script's parser out of its ``parse_args`` before it parses anything."""


def value_kind(action: argparse.Action) -> str:
    """The README table's value column for one argparse action."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return 'switch'
    if action.choices:
        return 'choice'
    if action.type in (int, float):
        return action.type.__name__
    return action.metavar or 'text'


@pytest.fixture(scope='module')
def script_flags() -> dict[str, dict[str, str]]:
    """{flag (its first spelling): {script: value kind}} of every script."""
    def capture(parser, *args, **kwargs):
        raise Captured(parser)

    flags: dict[str, dict[str, str]] = defaultdict(dict)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, 'parse_args', capture)
        for script in SCRIPTS:
            with pytest.raises(Captured) as captured:
                importlib.import_module(script).parse_args(['--dataset', 'digits'])
            for action in captured.value.args[0]._actions:
                if action.option_strings and action.option_strings[0] != '-h':
                    flags[action.option_strings[0]][script] = value_kind(action)
    return flags


def readme_table() -> dict[str, tuple[str, dict[str, str]]]:
    """{flag: (value kind, {script: kind} exceptions)} from the README's flag table."""
    section = (ROOT / 'README.md').read_text(encoding='utf-8').split('### Flags', 1)[1].split('\n#', 1)[0]
    table = {}
    for row in re.findall(r'^\| (`--.*?) \| (.*?) \|', section, re.M):
        kind, exceptions = re.fullmatch(r'(\S+)(?: \((.*)\))?', row[1]).groups()
        excepted = dict(re.findall(r'(\w+)\.py: (\S+)', exceptions or ''))
        for flag in re.findall(r'`(--[\w-]+)`', row[0]):
            table[flag] = (kind, excepted)
    return table


def test_every_flag_name_has_one_kind_of_value_in_every_script(script_flags):
    table = readme_table()
    for flag, kinds in script_flags.items():
        expected, excepted = table.get(flag, (None, {}))
        usual = {kind for script, kind in kinds.items() if script not in excepted}
        assert len(usual) == 1, f'{flag} takes {kinds}: one kind of value per flag name'
        for script, kind in excepted.items():
            assert kinds.get(script) == kind, f'{flag} in {script}.py: the README says {kind}, the parser {kinds}'
        if expected is not None:
            assert usual == {expected}, f'{flag}: the README says {expected}, the parsers {kinds}'


def test_the_readme_table_lists_every_flag_of_several_scripts_and_no_other(script_flags):
    table = readme_table()
    shared = {flag for flag, kinds in script_flags.items() if len(kinds) > 1 and not set(kinds) <= TRAINING_PAIR}
    assert shared <= set(table), f'flags of several scripts missing from the README table: {shared - set(table)}'
    unknown = set(table) - set(script_flags)
    assert not unknown, f'the README table names flags no script takes: {unknown}'


# A flag value each script refuses, and the libraries that take seconds to import: none may load before it answers.
BAD_FLAG = {'scratch': ['--epochs', '-1'], 'finetune': ['--epochs', '0'], 'evaluate': ['--dataset', 'nope'],
            'search': ['--trials', '0'], 'study': ['--weights', 'w', '--subnets', '1'], 'convert': ['--format', 'nope'],
            'demo': ['--port', '0']}
HEAVY = {'torch', 'torchvision', 'timm', 'nni', 'lightning', 'pytorch_lightning'}
RUN_AS_SCRIPTS = """
import contextlib, io, json, runpy, sys
results = []
for script, argv in CASES:
    sys.argv = [f'{script}.py', *argv]
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            runpy.run_path(f'{script}.py', run_name='__main__')
            code = None
        except SystemExit as stop:
            code = stop.code
    results.append([script, argv, code, sorted({name.split('.')[0] for name in sys.modules} & HEAVY),
                    output.getvalue()])
print(json.dumps(results))
"""


def run_as_scripts(cases: list[tuple[str, list[str]]]) -> list[list]:
    """Each ``(script, argv)`` run as ``python <script>.py`` in one interpreter, in order: its exit status, the heavy
    libraries loaded so far (the first case that loads one is the culprit) and what it printed."""
    program = f'CASES = {cases!r}\nHEAVY = {HEAVY!r}\n{RUN_AS_SCRIPTS}'
    result = subprocess.run([sys.executable, '-c', program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_help_and_a_flag_error_answer_before_any_heavy_library_loads():
    """Every script, run as ``python <script>.py``, answers --help (exit 0) and a refused flag value (exit 2) with
    none of torch, torchvision, timm, NNI or Lightning imported: they load once the flags are checked."""
    cases = [(script, argv) for script in SCRIPTS for argv in (['--help'], BAD_FLAG[script])]
    for script, argv, code, heavy, _ in run_as_scripts(cases):
        expected = 0 if argv == ['--help'] else 2
        assert (code, heavy) == (expected, []), f'{script}.py {" ".join(argv)}: exit {code}, imported {heavy}'


def test_a_wrong_datapath_is_the_first_line_printed_before_any_heavy_library_loads(tmp_path):
    """A mistyped ``--datapath`` is what every script that reads data says first (no recipe or space line before it),
    and says before torch, NNI, timm or Lightning load (the seconds a user would wait for it)."""
    missing = str(tmp_path / 'no-such-folder')
    cases = [(script, [*dataset, '--datapath', missing, *(['--weights', 'w'] if script == 'study' else [])])
             for script in ('scratch', 'finetune', 'evaluate', 'search', 'study')
             for dataset in ([], ['--dataset', 'folder'])]
    for script, argv, code, heavy, printed in run_as_scripts(cases):
        assert (code, heavy) == (2, []), f'{script}.py {" ".join(argv)}: exit {code}, imported {heavy}'
        first = (printed.splitlines() or ['(nothing printed)'])[0]
        assert first.startswith(f'error: --datapath {missing} does not exist'), (script, argv, printed)
