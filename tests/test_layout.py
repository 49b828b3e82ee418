"""The layout: imports run one way (scripts -> cli -> search and training -> search_data -> data -> image_folder ->
folders and samplers, space -> checkpoints -> layers -> arch, utils), no cycle, and no library module depends on the
command-line layer."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # make test-fast

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob('*.py')}


def imported_names(nodes) -> set[str]:
    """The top-level names imported by ``nodes``: import statements, and ``importlib.import_module`` /
    ``__import__`` calls, whose name must be a literal (a computed one could hide any import)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split('.')[0])
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ('importlib.import_module', 'import_module',
                                                                      '__import__'):
            argument = node.args[0] if node.args else None
            assert isinstance(argument, ast.Constant), f'an import by a computed name: {ast.unparse(node)}'
            names.add(argument.value.split('.')[0])
    return names


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at the top, inside a function or by a name in a string."""
    return imported_names(ast.walk(ast.parse(path.read_text()))) & MODULES.keys()


def top_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports at its top (when it is imported)."""
    return imported_names(ast.parse(path.read_text()).body) & MODULES.keys()


def is_script(path: Path) -> bool:
    return "if __name__ == '__main__':" in path.read_text()


GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def test_no_import_cycle():
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        assert name not in stack, f'import cycle: {" -> ".join(stack[stack.index(name):] + [name])}'
        if name not in done:
            for dep in GRAPH[name]:
                visit(dep, stack + [name])
            done.add(name)

    for name in GRAPH:
        visit(name, [])


def test_no_library_module_imports_the_command_line_layer_or_a_script():
    """No library module imports a script or cli, and a script imports no other script."""
    scripts = {name for name, path in MODULES.items() if is_script(path)}
    assert {'evaluate', 'search', 'scratch', 'finetune', 'convert', 'demo', 'study', 'trial'} <= scripts
    for name, deps in GRAPH.items():
        assert not deps & scripts, f'{name} imports a script: {deps & scripts}'
        if name not in scripts and name != 'cli':
            assert 'cli' not in deps, f'library module {name} imports cli'


def test_space_utils_and_the_trial_relay_import_nothing_heavy_of_the_project_at_the_top():
    """space.py can be copied with the four files below it alone; utils.py is below everything; the trial NNI
    starts for every candidate imports only the failure records and the workers' protocol (standard library) until
    it serves."""
    assert top_imports(MODULES['utils']) == set() and top_imports(MODULES['failures']) == set()
    assert top_imports(MODULES['workers']) == set() and top_imports(MODULES['trial']) == {'failures', 'workers'}
    assert GRAPH['arch'] == set() and GRAPH['layers'] == {'arch'}
    assert GRAPH['checkpoints'] == {'arch', 'layers', 'utils'}
    assert GRAPH['space'] == {'layers', 'arch', 'checkpoints', 'utils'}


def test_library_modules_take_values_not_a_namespace():
    """Flags turn into values or a settings dataclass in the scripts (cli.from_flags); below them no module
    knows argparse."""
    scripts = {name for name, path in MODULES.items() if is_script(path)}
    for name, path in MODULES.items():
        if name not in scripts and name != 'cli':
            text = path.read_text()
            assert 'argparse' not in text and 'Namespace' not in text, f'{name} knows argparse'
