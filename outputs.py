"""The files of the scripts' ``--output`` folders, by name: a training run's (:class:`RunFolder`: scratch.py,
finetune.py) and a search's (:class:`SearchFolder`, with the experiment and the command line it records). Files
only: the scripts and the study find a run's files without loading what writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from arch import arch_key
from failures import FOLDER as FAILURES
from utils import UserError, read_json


class _File:
    """A file or folder of an output folder, by name: ``folder.best`` is ``folder.root / 'best.json'``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: Any, owner: type | None = None) -> Any:
        return self if folder is None else folder.root / self.name


@dataclass(frozen=True)
class RunFolder:
    """The files of one training run's ``--output`` folder (scratch.py, finetune.py)."""
    root: Path
    checkpoints = _File('checkpoints')  # Lightning's last.ckpt (what --resume continues) and best.ckpt
    record = _File('run.json')  # what a resumed run must match (engine.run_fingerprint)
    metrics = _File('metrics.json')  # the last epoch's metrics, written with the weights
    logs = _File('logs')  # Lightning's CSV logs, a version_N per (resumed) run

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / 'last.ckpt'

    def weights(self, kind: str) -> Path:
        """The trained weights: ``supernet.pth``, or ``subnet.pth`` for one arch (``kind``)."""
        return self.root / f'{kind}.pth'

    def ema_weights(self, kind: str) -> Path:
        return self.root / f'{kind}-ema.pth'

    def interrupted(self, kind: str) -> bool:
        """A run that wrote a checkpoint but not its weights: ``--resume`` continues it."""
        return self.last_checkpoint.is_file() and not self.weights(kind).is_file()


@dataclass(frozen=True)
class SearchFolder:
    """The files of one search's ``--output`` folder."""
    root: Path
    candidates = _File('candidates')  # one record per finished candidate, named by arch.arch_key
    failures = _File(FAILURES)
    latency = _File('latency.json')
    worker_spec = _File('worker.json')
    search_data = _File('search-data.pt')
    best = _File('best.json')
    experiment = _File('experiment.json')  # the experiment id, the command line and the fingerprint a resume matches
    best_subnet = _File('best-subnet.pth')  # the best candidate's inherited weights, a subnet file
    export = _File('export')  # --export's standalone files of the best candidate
    pareto = _File('pareto.png')
    results_json = _File('candidates.json')
    results_csv = _File('candidates.csv')

    def record(self, arch: Mapping[str, Any]) -> Path:
        return self.candidates / f'{arch_key(arch)}.json'

    def records(self) -> list[Path]:
        return sorted(self.candidates.glob('*.json'))

    def experiment_id(self) -> str:
        """The id of the search here, which ``--resume`` continues, read before a folder is made for nothing."""
        if not self.experiment.is_file():
            raise UserError(f'--resume: {self.root} holds no search to continue (no {self.experiment.name}): pass '
                            'the --output of that search')
        experiment_id = read_json(self.experiment).get('experiment_id')
        if not isinstance(experiment_id, str) or not experiment_id:
            raise UserError(f'{self.experiment} is damaged (no experiment_id); delete the folder, or use another '
                            '--output')
        return experiment_id

    def resume_argv(self) -> list[str]:
        """The command that continues the search here: its own flags, ``--output`` and ``--resume``."""
        kept, skip = [], False
        for arg in read_json(self.experiment)['argv']:
            if skip:
                skip = False
            elif arg == '--output':
                skip = True
            elif arg != '--resume' and not arg.startswith('--output='):
                kept.append(arg)
        return ['python', 'search.py', *kept, '--output', str(self.root), '--resume']
