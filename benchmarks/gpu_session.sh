#!/usr/bin/env bash
# The GPU measurements of a site's step, prepared as one short run for a session that is lent
# a GPU machine (which starts bare, holds PyTorch but not Opacus, pydicom or nibabel, and
# reaches no package index).
#
# Here, once per checkout (about 6 MB of wheels into .whl/, which .gitignore lists; the versions
# this checkout's .venv holds):
#   bash benchmarks/gpu_session.sh wheels
# There, through the device tool, carrying .whl (timeout_s 560: every step has its own limit,
# so a slow one leaves the others' results):
#   bash benchmarks/gpu_session.sh run
# It writes benchmarks/results/{device-cuda-bf16,mixed-precision-cuda,speed-cuda,speed-cuda-bf16}/
# there and copies their results files (7) to $OUT; put them in the same folders here.
#
# DEVICE, STEPS, REPEATS and RESULTS override the defaults (cuda, 10, 3, benchmarks/results):
# `DEVICE=cpu STEPS=2 REPEATS=1 RESULTS=/tmp/r OUT=/tmp/o bash benchmarks/gpu_session.sh run`
# tries the plumbing on a CPU without touching the committed results.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  wheels)
    pins=$(.venv/bin/python -c "import importlib.metadata as m; print(' '.join(f'{d}=={m.version(d)}' for d in ('opacus', 'nibabel', 'pydicom')))")
    # shellcheck disable=SC2086  # one argument per pin
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform any -d .whl $pins || exit 1
    ls -l .whl
    ;;
  run)
    device=${DEVICE:-cuda} steps=${STEPS:-10} repeats=${REPEATS:-3} out=${OUT:-/tmp/gpu-session-out}
    results=${RESULTS:-benchmarks/results}
    suffix=$([ "$device" = cuda ] && echo -cuda || echo "-$device")
    mkdir -p "$out"
    if ls .whl/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed"; exit 1; }
      export PYTHONPATH=/tmp/site:$PWD
    else
      export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1
    python=${PYTHON:-python3}
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    status=0
    step() {  # a time limit in seconds, then the command
      local limit=$1; shift
      echo "== $* (at most ${limit} s)"
      timeout "$limit" "$@" || { echo "== failed or timed out ($?): $*"; status=1; }
    }
    step 120 "$python" benchmarks/device_check.py --device "$device" --precision bf16 \
      --out "$results/device-$device-bf16"
    step 150 "$python" benchmarks/mixed_precision.py --device "$device" --steps "$steps" --repeats "$repeats" \
      --out "$results/mixed-precision$suffix"
    step 150 "$python" benchmarks/speed.py --device "$device" --steps "$steps" --repeats "$repeats" \
      --out "$results/speed$suffix"
    step 120 "$python" benchmarks/speed.py --device "$device" --precision bf16 --steps "$steps" --repeats "$repeats" \
      --out "$results/speed$suffix-bf16"
    for pair in "device-$device-bf16/results.md:device-$device-bf16.md" \
                "mixed-precision$suffix/results.md:mixed-precision$suffix.md" \
                "mixed-precision$suffix/results.json:mixed-precision$suffix.json" \
                "speed$suffix/results.md:speed$suffix.md" "speed$suffix/results.json:speed$suffix.json" \
                "speed$suffix-bf16/results.md:speed$suffix-bf16.md" \
                "speed$suffix-bf16/results.json:speed$suffix-bf16.json"; do
      source_file=$results/${pair%%:*}
      [ -f "$source_file" ] && cp "$source_file" "$out/${pair##*:}"
    done
    ls -l "$out"
    exit $status
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh wheels|run" >&2
    exit 2
    ;;
esac
