#!/usr/bin/env bash
# The one prepared GPU check, under 8 minutes on one GPU; writes bench/results/gpu-<card>-<date>.md.
#   bash bench/gpu.sh              # on a CUDA machine
#   bash bench/gpu.sh --dry-run    # every command on the CPU, tiny sizes, 64 px, bf16 only (checks the script)
# It runs: the cuda tests (pytest -m cuda); the training step and evaluation of the tiny preset at
# 224 px, batch 128, bf16 and fp32, each beside the official formulation (--reference) and the other
# attention path (--attention), with peak memory and the share of the card's peak FLOP/s; the data
# loader's images/s per worker; the search overhead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 CARD="cpu (dry run)" IMAGES=32 SEARCH="--small 1 --large 2" SIZE=64
  PRECISIONS=bf16  # fp32 runs the same commands with another --precision
else
  DEVICE=cuda BATCH=128 STEPS=20 WARMUP=3 IMAGES=512 SEARCH="" SIZE=224 PRECISIONS="bf16 fp32"
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
fi
# Dense peak TFLOP/s (bf16, fp32 without TF32) of the cards this is likely to meet; unknown: no share printed.
case "$CARD" in
  *H200*|*H100*SXM*|*H100*HBM3*) PEAK_BF16=989; PEAK_FP32=67 ;;
  *H100*) PEAK_BF16=756; PEAK_FP32=51 ;;
  *A100*) PEAK_BF16=312; PEAK_FP32=19.5 ;;
  *L40S*) PEAK_BF16=362; PEAK_FP32=91.6 ;;
  *) PEAK_BF16=; PEAK_FP32= ;;
esac
mkdir -p bench/results
SLUG=$(echo "$CARD" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
REPORT=bench/results/gpu-$SLUG-$(date +%Y-%m-%d).md
run() {  # a command, its output and its seconds, into the report
  local start=$SECONDS
  echo "\$ $*" | tee -a "$REPORT.tmp"
  "$@" 2>&1 | grep -v -i warn | tee -a "$REPORT.tmp"
  echo "($((SECONDS - start)) s)" | tee -a "$REPORT.tmp"
}
{
  echo "# bench/gpu.sh on $CARD, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo
  echo '```'
} > "$REPORT.tmp"
run "$PY" -m pytest -q -ra -m cuda tests/test_cuda.py -p no:cacheprovider
for precision in $PRECISIONS; do
  peak=$([ "$precision" = bf16 ] && echo "$PEAK_BF16" || echo "$PEAK_FP32")
  run "$PY" bench/train_step.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" --device "$DEVICE" \
    --precision "$precision" --steps "$STEPS" --warmup "$WARMUP" --reference --attention ${peak:+--peak-tflops "$peak"}
  run "$PY" bench/eval_throughput.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" --device "$DEVICE" \
    --precision "$precision" --steps "$STEPS" --warmup "$WARMUP" --reference --attention ${peak:+--peak-tflops "$peak"}
done
run "$PY" bench/data_throughput.py --images "$IMAGES" --workers 0 2
run "$PY" bench/search_overhead.py --engine sequential $SEARCH
echo '```' >> "$REPORT.tmp"
mv "$REPORT.tmp" "$REPORT"
echo "report: $REPORT"
