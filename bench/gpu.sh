#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in under 8 minutes: tiny preset, 224 px, batch 128, bf16 and fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for precision in bf16 fp32; do
  "$PY" bench/train_step.py --name tiny --batch-size 128 --device cuda --precision "$precision" --steps 20 --reference --ceiling
  "$PY" bench/eval_throughput.py --name tiny --batch-size 128 --device cuda --precision "$precision" --steps 20 --reference
done
"$PY" bench/search_overhead.py --engine sequential
