#!/usr/bin/env bash
# The GPU work of sparse-lth in parts that each fit one device call (10 minutes at most), for a session with a
# lent H100/H200 (30 minutes of device time in all). Run from the repository root:
#
#     SPARSE_LTH_COMMIT=<sha> bash benchmarks/gpu_suite.sh tests ceilings optim linear        # call 1
#     SPARSE_LTH_COMMIT=<sha> bash benchmarks/gpu_suite.sh conv-vgg19 model-vgg19 model-lenet  # call 2
#     SPARSE_LTH_COMMIT=<sha> bash benchmarks/gpu_suite.sh conv-resnet20 conv-conv6            # call 3, if time is left
#
# The order is the issues' priority: the targets need linear, optim, the VGG-19 conv layers and the VGG-19 step.
# Durations on an H100 are not known yet (no session has had one): every part runs under its own time limit
# (PART_LIMIT seconds, default 290) so that one part cannot eat a call, and the benchmarks write their rows as they
# go, so a part cut short still leaves what it measured. Then, here: copy the CSVs into benchmarks/results/ and
# run `python benchmarks/summarize.py`.
#
# Parts:
#   tests           the Triton kernel and layer tests, compiled (not interpreted)
#   ceilings        measured copy bandwidth and matmul rates (bench_ceilings.py)
#   linear          bench_linear_gpu.py, every layer, density, op, precision
#   optim           bench_optim.py on CUDA, fp32 and bf16 parameters
#   conv-vgg19 | conv-resnet20 | conv-conv6     bench_conv_gpu.py on that network's layers
#   model-vgg19 | model-lenet                   bench_model_step.py: whole training steps
#   quick           a fast smoke run of linear and conv (--quick) to check that everything compiles
#
# The package is imported from the checkout (PYTHONPATH; no pip install: the device machine has no network, and
# sparse_lth finds its kernels/ beside it in a source checkout). Result CSVs are written under
# benchmarks/results/ with the device named and copied, with one log for the call, to $OUT (when set) so that they
# come back; commit them from there. SPARSE_LTH_COMMIT (set it to `git rev-parse --short=12 HEAD` on the machine
# that has the git history) labels the rows, since the device copy of the tree has no .git.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGDIR=${OUT:-/tmp/sparse_lth_gpu_suite}   # one log per call: $OUT brings back 8 files at most
mkdir -p "$LOGDIR" benchmarks/results
LOG="$LOGDIR/suite_$(date -u +%H%M%S).log"
MARK=$(mktemp)   # result files newer than this were written by this call
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # sparse_lth (and its kernels) from the checkout
PY=${PYTHON:-python3}

if [ $# -eq 0 ]; then
    sed -n 2,20p "$0"
    exit 2
fi

DEV=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import torch; from baselines import slug; print(slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)

LIMIT=${PART_LIMIT:-290}
status=0
for part in "$@"; do
    log="$LOG"
    echo "=== $part  $(date -u +%H:%M:%S)" | tee -a "$log"
    t0=$(date +%s)
    case "$part" in
        tests)
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
            $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
            # heuristic configurations only (autotuning every test shape would compile for minutes); the benchmarks
            # check the autotuned kernels against the references
            SPARSE_LTH_AUTOTUNE=0 timeout "$LIMIT" $PY -m pytest -q -p no:cacheprovider --maxfail=20 \
                tests/test_kernels_linear.py tests/test_kernels_conv.py tests/test_optim.py \
                tests/test_layers_triton.py tests/test_layers.py 2>&1 | tee -a "$log"
            ;;
        ceilings)
            timeout "$LIMIT" $PY benchmarks/bench_ceilings.py --device cuda 2>&1 | tee -a "$log"
            ;;
        linear)
            timeout "$LIMIT" $PY benchmarks/bench_linear_gpu.py 2>&1 | tee -a "$log"
            ;;
        optim)
            timeout "$LIMIT" $PY benchmarks/bench_optim.py --device cuda 2>&1 | tee -a "$log"
            timeout "$LIMIT" $PY benchmarks/bench_optim.py --device cuda --dtype bfloat16 --out "benchmarks/results/optim_bf16_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        conv-vgg19|conv-resnet20|conv-conv6)
            net=${part#conv-}
            timeout "$LIMIT" $PY benchmarks/bench_conv_gpu.py --layers "$net/" --out "benchmarks/results/conv_${net}_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        model-vgg19)
            timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model vgg19 --batch 128 --device cuda --densities 1.0 0.2 0.05 0.015 2>&1 | tee -a "$log"
            ;;
        model-lenet)
            timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model lenet300_100 --batch 60 --device cuda 2>&1 | tee -a "$log"
            ;;
        quick)
            timeout "$LIMIT" $PY benchmarks/bench_linear_gpu.py --quick --out /tmp/linear_quick.csv 2>&1 | tee -a "$log"
            timeout "$LIMIT" $PY benchmarks/bench_conv_gpu.py --quick --out /tmp/conv_quick.csv 2>&1 | tee -a "$log"
            ;;
        *)
            echo "unknown part: $part" | tee -a "$log"
            status=2
            continue
            ;;
    esac
    rc=$?
    [ $rc -ne 0 ] && status=$rc
    echo "=== $part: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$log"
done
# the result files this call wrote go back through $OUT (flat, at most 7 besides the log)
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -maxdepth 1 -name '*.csv' -newer "$MARK" | head -n 7 | xargs -r cp -t "$OUT/"
fi
rm -f "$MARK"
exit $status
