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


@dataclass(frozen=True)
class RunFolder:
    """The files of one training run's ``--output`` folder (scratch.py, finetune.py)."""
    root: Path

    @property
    def checkpoints(self) -> Path:
        """Lightning's ``last.ckpt`` (what ``--resume`` continues) and ``best.ckpt``."""
        return self.root / 'checkpoints'

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / 'last.ckpt'

    def weights(self, kind: str) -> Path:
        """The trained weights: ``supernet.pth``, or ``subnet.pth`` for one arch (``kind``)."""
        return self.root / f'{kind}.pth'

    def ema_weights(self, kind: str) -> Path:
        return self.root / f'{kind}-ema.pth'

    @property
    def record(self) -> Path:
        """What a resumed run must match (``engine.run_fingerprint``)."""
        return self.root / 'run.json'

    @property
    def metrics(self) -> Path:
        """The last epoch's metrics, written with the weights."""
        return self.root / 'metrics.json'

    @property
    def logs(self) -> Path:
        """Lightning's CSV logs, a ``version_N`` per (resumed) run."""
        return self.root / 'logs'

    def interrupted(self, kind: str) -> bool:
        """A run that wrote a checkpoint but not its weights: ``--resume`` continues it."""
        return self.last_checkpoint.is_file() and not self.weights(kind).is_file()


@dataclass(frozen=True)
class SearchFolder:
    """The files of one search's ``--output`` folder."""
    root: Path

    @property
    def candidates(self) -> Path:
        """One record per finished candidate, named by :func:`arch.arch_key`."""
        return self.root / 'candidates'

    def record(self, arch: Mapping[str, Any]) -> Path:
        return self.candidates / f'{arch_key(arch)}.json'

    def records(self) -> list[Path]:
        return sorted(self.candidates.glob('*.json'))

    @property
    def failures(self) -> Path:
        return self.root / FAILURES

    @property
    def latency(self) -> Path:
        return self.root / 'latency.json'

    @property
    def worker_spec(self) -> Path:
        return self.root / 'worker.json'

    @property
    def search_data(self) -> Path:
        return self.root / 'search-data.pt'

    @property
    def best(self) -> Path:
        return self.root / 'best.json'

    @property
    def experiment(self) -> Path:
        """The experiment id, the command line and the fingerprint a resumed search must match."""
        return self.root / 'experiment.json'

    @property
    def best_subnet(self) -> Path:
        """The best candidate's inherited weights, a subnet file."""
        return self.root / 'best-subnet.pth'

    @property
    def export(self) -> Path:
        """``--export``'s standalone files of the best candidate."""
        return self.root / 'export'

    @property
    def pareto(self) -> Path:
        return self.root / 'pareto.png'

    @property
    def results_json(self) -> Path:
        return self.root / 'candidates.json'

    @property
    def results_csv(self) -> Path:
        return self.root / 'candidates.csv'

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
