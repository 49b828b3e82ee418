"""bench/gpu.sh, the one prepared GPU check, runs every one of its commands on the CPU as a dry run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gpu_script_dry_run_writes_a_report_of_every_command():
    before = set((ROOT / 'bench' / 'results').glob('gpu-cpu-dry-run-*.md'))
    result = subprocess.run(['bash', 'bench/gpu.sh', '--dry-run'], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env={**os.environ, 'PY': sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = set((ROOT / 'bench' / 'results').glob('gpu-cpu-dry-run-*.md'))
    report = (reports - before or reports).pop()
    try:
        text = report.read_text()
        assert '0 steps failed' in text and 'FAILED' not in text and 'KILLED' not in text, text[-3000:]
        assert 'skipped' in text and 'needs a CUDA GPU' in text  # pytest -m cuda without a GPU: visible reasons
        for line in ('wrote', 'best: top-1', 'per-class top-1',  # scratch / finetune, search, evaluate
                     'train_step tiny 64px batch 2 cpu bf16',
                     'eval autoformer-tiny frozen subnet 64px batch 2 cpu bf16',
                     'ours, one compiled graph', 'static compiled ViT', 'profile_step', 'search_speed', 'per worker'):
            assert line in text, line
        assert text.count('/ official') >= 2 and 'ours, other attention path' in text
    finally:
        report.unlink()
