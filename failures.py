"""A search's failure records: the first line of each failed candidate's error, in ``<output>/failures/``, for
search.py to show (a trial's stderr is not where users look). Plain files and no imports of the project: the
trial relay (trial.py), a warm worker and the search process all write or read them."""
from __future__ import annotations

import time
from pathlib import Path

FOLDER = 'failures'


def record_failure(output: str | Path, name: str, message: str) -> None:
    """The error of the failed candidate ``name`` of the search in ``output``."""
    folder = Path(output) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{time.time_ns()}-{name}.txt').write_text(message + '\n')


def first_failure(output: str | Path) -> str | None:
    """The first error a candidate of the search in ``output`` failed with."""
    files = sorted((Path(output) / FOLDER).glob('*.txt'))
    return files[0].read_text().strip().splitlines()[0] if files else None
