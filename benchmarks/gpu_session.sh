#!/usr/bin/env bash
# One prepared measurement run on a lent GPU machine (issue 13): about 5 minutes on an H100/H200.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh [--artifacts DIR] [--dry-run]
#
# Run from anywhere; it works in the repository it lives in (not pip-installed: PYTHONPATH).
# onnxruntime-gpu in /tmp/ortsite (if present) is put first on PYTHONPATH. --artifacts DIR:
# model.pt, fcn.onnx, fcn.fp16.onnx (and fcn.fp16-ct32.onnx) made elsewhere; what is missing is
# made here (random weights, seed 0; exporting needs onnxscript, the FP16 ONNX
# onnxconverter-common). Steps run in priority order, each in its own process under its own
# time limit, within BUDGET seconds in all (default 330); one failing does not stop the others.
# Results: $OUT/*.json, per-step logs $OUT/log-*.txt, and $OUT/summary.md (printed at the end).
# --dry-run (or SMALL=1): everything on the CPU with tiny sizes, to find typos before the GPU run.
set -u
cd "$(dirname "$0")/.."
if [ -d /tmp/ortsite ]; then
  export PYTHONPATH=/tmp/ortsite:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
ARGS=()
DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --artifacts) ARGS+=(--artifacts "$(cd "$2" && pwd)"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 [--artifacts DIR] [--dry-run]" >&2; exit 2 ;;
  esac
done
[ -n "${SMALL:-}" ] && DRY=1
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
WORK=${WORK:-$(mktemp -d /tmp/gpu-work.XXXXXX)}
BUDGET=${BUDGET:-330}
START=$SECONDS

# STEPS: the steps to run (default all), e.g. STEPS="env artifacts images e2e" for a rerun.
STEPS=${STEPS:-env artifacts images engine-ort16 engine-torch engine-ort32 e2e ceiling memory masks gpu-tests}
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# step LIMIT NAME ARGS...: run one driver step under min(LIMIT, what is left of BUDGET - 10 s).
step() {
  local cap=$1 name=$2; shift 2
  if ! wanted "$name"; then echo "== $name: not in STEPS"; return; fi
  local left=$((BUDGET - 10 - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then echo "== $name: skipped, budget spent"; return; fi
  local t0=$SECONDS
  timeout -k 5 "$limit" python3 benchmarks/gpu_session.py "$@" --work "$WORK" --out "$OUT" "${ARGS[@]}" \
    >"$OUT/log-$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s (limit $limit s)"
  [ $rc -ne 0 ] && tail -n 4 "$OUT/log-$name.txt" | cut -c1-300
}

echo "work: $WORK  out: $OUT  dry-run: $DRY"
step 30 env env
step 90 artifacts artifacts
step 30 images images
step 90 engine-ort16 engine ort16
step 35 engine-torch engine torch
step 50 engine-ort32 engine ort32
step 300 e2e e2e
step 60 ceiling ceiling
step 40 memory memory
step 90 masks masks
if wanted gpu-tests && python3 -c "import pytest" 2>/dev/null && [ "$DRY" = 0 ]; then
  left=$((BUDGET - 10 - (SECONDS - START)))
  if [ "$left" -ge 20 ]; then
    timeout -k 5 $((left < 60 ? left : 60)) python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runners.py tests/test_assembler.py tests/test_arena.py tests/test_devicedecode.py \
      >"$OUT/gpu-tests.txt" 2>&1
    echo "== gpu tests: rc $? ($(tail -n 1 "$OUT/gpu-tests.txt"))"
  fi
else
  echo "== gpu tests: skipped (no pytest here, or dry run)"
fi
timeout 20 python3 benchmarks/gpu_session.py summary --work "$WORK" --out "$OUT" "${ARGS[@]}" >"$OUT/log-summary.txt" 2>&1 \
  || tail -n 5 "$OUT/log-summary.txt"
echo "== total $((SECONDS - START)) s"
cat "$OUT/summary.md" 2>/dev/null | cut -c1-400 | head -c 9000
