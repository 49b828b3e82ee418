"""Run a project script and SIGKILL it halfway through its N-th write of a file: a fault injector.

    python tests/die_mid_write.py NAME_REGEX N SCRIPT [ARGS...]

The project writes a kept file through a temporary file beside it (``.NAME.XXXXXXXX.tmp``); on the
N-th write of a file whose name matches NAME_REGEX, half of the bytes reach the disk and then the
process is killed, as a power cut or the OOM killer would do.
"""
import os
import pathlib
import re
import runpy
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def kill_on_nth_write(name_regex: str, nth: int) -> None:
    writes = 0

    def patch(method_name: str, mode: str):
        original = getattr(pathlib.Path, method_name)

        def write(self, data, *args, **kwargs):
            nonlocal writes
            temporary = self.name.startswith('.') and self.name.endswith('.tmp')
            if temporary and re.fullmatch(name_regex, self.name[1:].rsplit('.', 2)[0]):
                writes += 1
                if writes == nth:
                    data = bytes(data) if mode == 'wb' else data
                    with open(self, mode) as f:
                        f.write(data[:len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(self, data, *args, **kwargs)
        setattr(pathlib.Path, method_name, write)

    patch('write_bytes', 'wb')
    patch('write_text', 'w')


if __name__ == '__main__':
    target, count, script, *arguments = sys.argv[1:]
    kill_on_nth_write(target, int(count))
    sys.path.insert(0, str(ROOT))
    sys.argv = [script, *arguments]
    runpy.run_path(str(ROOT / script), run_name='__main__')
