#!/usr/bin/env bash
# The one prepared GPU check: every script end to end on one GPU, the CUDA tests and the speed figures, within
# BUDGET seconds (default 330: a step gets at most what is left, and the steps past it are listed as skipped);
# writes bench/results/gpu-<card>-<date>.md. With $OUT set (the device tool) the report is rewritten there after
# every step, beside every step's log, so a run cut short still brings back what it measured.
#   bash bench/gpu.sh              # on a CUDA machine (the device tool: export PYTHONPATH=$PWD/.gpu-site first)
#   bash bench/gpu.sh --dry-run    # every command on the CPU, tiny sizes, 64 px, bf16 only, nothing compiled
# Each step runs under `timeout -s KILL` with its output in a file (never a pipe: a child left behind holding a
# pipe hangs the reader), so a hung or crashed step costs its limit and the report still comes out. Most
# important first: the bf16 figures (training step, evaluation, each beside the official formulation, the one
# compiled graph and a static compiled ViT), every script and the CUDA tests, the profiles, the search's seconds
# per candidate, fp32, and the data loader's images/s per worker.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu BATCH=2 STEPS=1 WARMUP=0 CARD="cpu (dry run)" SIZE=64 PRECISIONS=bf16
  DATA_IMAGES=96 SEARCH_IMAGES=64 CANDIDATES=1 EPOCHS=1 STUDY="--subnets 3 --control-draws 1"
  export TORCH_COMPILE_DISABLE=1  # the compiled variants run eagerly: the commands are checked, not inductor
  BUDGET=${BUDGET:-900}  # a CPU shared with other tests
else
  DEVICE=cuda BATCH=128 STEPS=20 WARMUP=3 SIZE=224 PRECISIONS="bf16 fp32"
  DATA_IMAGES=512 SEARCH_IMAGES=10000 CANDIDATES=20 EPOCHS=2 STUDY=
  BUDGET=${BUDGET:-330}
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
WORK=$(mktemp -d)
LOGS=${OUT:-$(mktemp -d)}/logs  # kept after the run: the report points at them
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
FAILED=0
step() {  # step NAME SECONDS COMMAND...: the command under a hard limit, its log, status and seconds in the report
  local name=$1 limit=$2 start=$SECONDS status left=$((BUDGET - SECONDS))
  shift 2
  echo "\$ $*" >> "$REPORT.tmp"
  if [ "$left" -lt 15 ]; then
    echo "(skipped: the run's budget of $BUDGET s is spent)" >> "$REPORT.tmp"
    echo >> "$REPORT.tmp"
    FAILED=$((FAILED + 1))
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout -s KILL "$limit" "$@" > "$LOGS/$name.log" 2>&1 < /dev/null
  status=$?
  # the last lines, without warnings and progress bars (the whole log is in $LOGS)
  grep -v -i -e warn -e 'it/s' -e 's/it' -e $'\e' "$LOGS/$name.log" | tail -n 16 >> "$REPORT.tmp"
  case $status in
    0) echo "($((SECONDS - start)) s)" >> "$REPORT.tmp" ;;
    137) echo "(KILLED, exit 137: its limit of $limit s, or out of memory; see $LOGS/$name.log)" >> "$REPORT.tmp"
         FAILED=$((FAILED + 1)) ;;
    *) echo "(FAILED with exit status $status after $((SECONDS - start)) s: see $LOGS/$name.log)" >> "$REPORT.tmp"
       FAILED=$((FAILED + 1)) ;;
  esac
  echo >> "$REPORT.tmp"
  [ -n "${OUT:-}" ] && cp "$REPORT.tmp" "$OUT/$(basename "$REPORT")"
  echo "$name: exit $status, $((SECONDS - start)) s"
}
{
  echo "# bench/gpu.sh on $CARD, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo
  echo '```'
} > "$REPORT.tmp"

speed() {  # speed PRECISION: the tiny space at 224 px, batch 128 (the official per-GPU batch), training and evaluation
  local precision=$1 peak other=
  peak=$([ "$precision" = bf16 ] && echo "$PEAK_BF16" || echo "$PEAK_FP32")
  [ "$precision" = bf16 ] && other=--attention
  step "train-step-$precision" 200 "$PY" bench/train_step.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" \
    --device "$DEVICE" --precision "$precision" --steps "$STEPS" --warmup "$WARMUP" --reference --compiled $other \
    ${peak:+--peak-tflops "$peak"}
  step "eval-$precision" 150 "$PY" bench/eval_throughput.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" \
    --device "$DEVICE" --precision "$precision" --steps "$STEPS" --warmup "$WARMUP" --reference --compiled $other \
    ${peak:+--peak-tflops "$peak"}
}
speed bf16

# Every script once on the GPU, on the bundled digits (the demo space), as a user types it; then the CUDA tests.
RUN=$WORK/run
GPUS=$([ "$DEVICE" = cuda ] && echo 1 || echo 0)
step scratch 120 "$PY" scratch.py --dataset digits --epochs "$EPOCHS" --warmup 0 --num-workers 2 --gpus "$GPUS" \
  --output "$RUN/scratch"
step scratch-compiled 150 "$PY" scratch.py --dataset digits --epochs 1 --warmup 0 --num-workers 2 --gpus "$GPUS" \
  --compile --output "$RUN/scratch-compiled"
step search 90 "$PY" search.py --weights "$RUN/scratch/supernet.pth" --engine sequential --trials 4 \
  --device "$DEVICE" --num-workers 2 --output "$RUN/search"
step search-compiled 120 "$PY" search.py --weights "$RUN/scratch/supernet.pth" --engine sequential --trials 4 \
  --device "$DEVICE" --num-workers 2 --compile --output "$RUN/search-compiled"
step finetune 90 "$PY" finetune.py --weights "$RUN/scratch/supernet.pth" --arch "$RUN/search/best.json" \
  --dataset digits --epochs 1 --warmup 0 --num-workers 2 --gpus "$GPUS" --output "$RUN/finetune"
step evaluate 60 "$PY" evaluate.py --weights "$RUN/finetune/subnet.pth" --device "$DEVICE" --num-workers 2
step study 150 "$PY" study.py --weights "$RUN/scratch/supernet.pth" --dataset digits --quick $STUDY \
  --device "$DEVICE" --output "$RUN/study"
step pytest-cuda 200 "$PY" -m pytest -q -ra -m cuda tests/test_cuda.py tests/test_ddp_one_process.py \
  -p no:cacheprovider

# Where the time goes, eager and compiled (the top kernels and operators, the GPU's busy share); the search's
# seconds per candidate; fp32; the data loader against the bf16 training rates.
step profile-eager 90 "$PY" bench/profile_step.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" \
  --device "$DEVICE" --precision bf16 --steps 3 --warmup 1 --top 15
step profile-compiled 150 "$PY" bench/profile_step.py --name tiny --img-size "$SIZE" --batch-size "$BATCH" \
  --device "$DEVICE" --precision bf16 --steps 3 --warmup 2 --top 15 --compiled
step search-speed 200 "$PY" bench/search_speed.py --name tiny --img-size "$SIZE" --images "$SEARCH_IMAGES" \
  --candidates "$CANDIDATES" --device "$DEVICE"
for precision in $PRECISIONS; do
  [ "$precision" = bf16 ] || speed "$precision"
done
RATES='s/.*: ours \([0-9.]*\) images\/s.*ours, one compiled graph \([0-9.]*\) images\/s.*/eager=\1 compiled=\2/p'
FEED=$(sed -n "$RATES" "$LOGS/train-step-bf16.log" 2>/dev/null | head -1)
[ -n "$FEED" ] || echo "(no bf16 training rate to translate into loader workers: see train-step-bf16)" >> "$REPORT.tmp"
step data-loader 90 "$PY" bench/data_throughput.py --images "$DATA_IMAGES" --img-size "$SIZE" --workers 0 2 4 \
  --feed $FEED
echo '```' >> "$REPORT.tmp"
echo "$FAILED steps failed, were killed or skipped" >> "$REPORT.tmp"
mv "$REPORT.tmp" "$REPORT"
[ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/"
echo "report: $REPORT ($FAILED steps failed or skipped; logs in $LOGS)"
exit $((FAILED > 0))
