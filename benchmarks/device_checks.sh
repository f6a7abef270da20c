#!/usr/bin/env bash
# The checks that need the device machine (one CUDA GPU, 16 cores), as one run that fits the
# 15 minutes of device time a session gets (the machine's start included):
#
#   1. pytest -m gpu: the end-to-end run on GPU workers, the fused runner and materialized
#      features on CUDA (skipped everywhere else);
#   2. busy.py and mop_scaling.py --part hops on local workers, with more cores than workers
#      (the 2-core development machine has none to spare for the driver: see benchmarks/README);
#   3. overhead.py --device cuda (one repeat) and fusion.py --device cuda --quick: the GPU
#      sections of the benchmarks.
#
# Each step has its own time limit (510 s in all), so that one slow step still leaves the others
# their turn; what each printed (checks.log) and the tables busy.md, mop_hops.md and
# overhead_cuda.md come back under $OUT (fusion's quick run prints its table to the log).
#
# On the development machine, once (the device has no package index; it has torch, numpy,
# pandas, pyarrow, scikit-learn, tensorboard and pytest, not cerebro's other dependencies):
#     bash benchmarks/device_checks.sh prepare        # wheels for Python 3.12 into .whl/
# Then with the device tool: run(command="bash benchmarks/device_checks.sh run",
#                                carry=[".whl"], timeout_s=600)
# Without an $OUT (a dry run here, on CPU) the logs go to /tmp/device-checks.
set -u
cd "$(dirname "$0")/.."

WHEELS=(sqlalchemy greenlet alembic mako optuna colorlog)

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
}

step() {  # step NAME SECONDS COMMAND...: one check under its own limit, logged in $LOG
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local began=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "== $name: rc $? in $((SECONDS - began)) s" | tee -a "$LOG"
}

run() {
    OUT=${OUT:-/tmp/device-checks}
    LOG=$OUT/checks.log
    mkdir -p "$OUT"
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c 'import os, torch; print(os.cpu_count(), "cores; torch", torch.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1 |
        tee "$LOG"
    # Most telling first: correctness on the GPU, then what more cores do to small units.
    step gpu_tests 110 python3 -m pytest -p no:cacheprovider -m gpu -o addopts="" -q -ra \
        tests/test_gpu.py tests/test_fused_runner.py tests/test_transfer.py
    step busy 70 python3 benchmarks/busy.py --workload demo tiny 6mlp --lags 0 2 --out "$OUT"
    step hops 200 python3 benchmarks/mop_scaling.py --part hops --backends local --out "$OUT"
    step overhead_cuda 70 python3 benchmarks/overhead.py --device cuda --repeats 1 --out "$OUT"
    step fusion_cuda 60 python3 benchmarks/fusion.py --device cuda --quick
    ls -l "$OUT"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/device_checks.sh prepare|run" >&2; exit 2 ;;
esac
