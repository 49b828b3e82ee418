"""Counts the opens of one file, one line per open with the pid of the process that opened it: every Python
process of a search started with this folder on PYTHONPATH loads it (the tests of the search's stages)."""
import os
import sys


def _record_open(event: str, args: tuple) -> None:
    watched, log = os.environ.get('AUTOFORMER_AUDIT_WATCH'), os.environ.get('AUTOFORMER_AUDIT_LOG')
    if event != 'open' or not watched or not log or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if os.path.abspath(os.fsdecode(args[0])) == watched:
        with open(log, 'a') as out:  # an open of another path: not recorded
            out.write(f'{os.getpid()}\n')


sys.addaudithook(_record_open)
