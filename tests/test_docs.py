"""Every Python block of tutorials.md and README.md runs (in order, one session per document), and prints
what the document says it prints: a comment line right after a ``print(...)`` line is its output."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def python_blocks(document: Path) -> list[str]:
    return re.findall(r'```python\n(.*?)```', document.read_text(), flags=re.S)


def documented_outputs(blocks: list[str]) -> list[str]:
    """The ``# output`` comment lines that follow a line starting with ``print(``."""
    outputs = []
    for block in blocks:
        lines = block.splitlines()
        outputs += [after.lstrip('# ').strip() for before, after in zip(lines, lines[1:])
                    if before.startswith('print(') and after.startswith('# ')]
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize('document', ['tutorials.md', 'README.md'])
def test_python_blocks_run(document, tmp_path):
    blocks = python_blocks(ROOT / document)
    if document == 'tutorials.md':
        assert len(blocks) >= 6
    for index, block in enumerate(blocks):
        (tmp_path / f'block{index}.py').write_text(block)
    # One session: each block sees the names of the blocks before it, as a reader would.
    runner = ('import sys, runpy\nnamespace = {}\n'
              f'for i in range({len(blocks)}):\n'
              f'    print(f"--- block {{i}}", flush=True)\n'
              f'    block = open(f"{tmp_path}/block{{i}}.py").read()\n'
              f'    exec(compile(block, f"{document} block {{i}}", "exec"), namespace)\n')
    result = subprocess.run([sys.executable, '-c', runner], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # a block's check printed rather than asserted would pass with False: none may print False
    assert not [line for line in result.stdout.splitlines() if line.split()[:1] == ['False']], result.stdout
    printed = result.stdout.splitlines()
    for output in documented_outputs(blocks):
        assert output in printed, f'{document} says a block prints {output!r}; it printed:\n{result.stdout[-2000:]}'
    if document == 'tutorials.md':
        assert len(documented_outputs(blocks)) >= 2
