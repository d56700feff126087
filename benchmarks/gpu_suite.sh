#!/usr/bin/env bash
# The GPU work of sparse-lth, for a session with a lent H100/H200. A session has 15 minutes of device time, the
# machine's start (a minute or more) included, and one command runs 10 minutes at most: so the plan is ONE call
# that measures what the kernel issues' targets need, in their priority order, and stops itself in time:
#
#     SPARSE_LTH_COMMIT=<sha> bash benchmarks/gpu_suite.sh plan15          # run tool: timeout_s 600
#
# plan15 = tests-core ceilings linear-targets optim-targets conv-targets model-vgg19-targets model-lenet-graph,
# under a total budget of SUITE_BUDGET seconds (default 540): each part runs under its own limit (below; PART_LIMIT
# overrides them all), cut to what is left of the budget, and a part with under 15 s left is skipped. Autotuning
# is shortened (SPARSE_LTH_TUNE_MS=5,20) in the *-targets parts, which take the target densities (1-5 %) first,
# and in model-lenet-graph. The benchmarks write their rows as they go and the result files are copied to $OUT
# after every part, so a call cut short still brings back what it measured. Then, here: copy the CSVs into benchmarks/results/ and run
# `python benchmarks/summarize.py`.
#
# Parts (default limit in seconds):
#   tests-core (150)      the Triton kernel and layer tests, compiled, heuristic configs (pytest-xdist -n 8 when
#                         installed: compiling is the cost, and it parallelizes), and train() with CUDA graphs
#                         against train() without
#   tests (290)           the same plus tests/test_layers.py, serial
#   ceilings (30)         measured copy bandwidth and matmul rates (bench_ceilings.py)
#   linear-targets (120)  bench_linear_gpu.py: the LeNet layers (seconds) and 4096x4096 b4096, all densities,
#                         fwd and fwd+bwd, fp32 and bf16, sparse kernels and SparseLinear after its automatic
#                         choice vs dense masking; the 4096x4096 ops time the
#                         gather and slab kernels against each other (variants_*.csv; ~16 extra compiles)
#   optim-targets (60)    bench_optim.py on CUDA, fp32: VGG-19 and 4096x4096 at 100/20/5/1 %
#   conv-targets (90)     bench_conv_gpu.py: VGG-19's 512->512 3x3 layers at 4x4 and 2x2 pixels, fwd+bwd,
#                         the kernels and SparseConv2d after its automatic choice vs dense masking
#   model-vgg19-targets (90)  bench_model_step.py: a VGG-19 step at 100 % and 1.5 % weights remaining
#   model-lenet-graph (45)  bench_model_step.py --cuda-graph: a LeNet-300-100 step at 2 %, 10 % and 100 %, eager and
#                         replayed as a CUDA graph (each graph checked against an eager twin), sparse-lth vs
#                         dense masking: where host time, not kernels, decides
#   host (30)             bench_host_overhead.py on this machine's CPU: sparse-lth's host time per step and per
#                         kernel launch (launches stubbed), which LeNet-sized layers' microsecond kernels leave in
#                         charge of a step
#   train-loop (60)       bench_train_loop.py: train() (what `sparse-lth imp` runs) on LeNet-300-100 at 2 % and
#                         100 %, waiting for the GPU only between evaluations against after every step
#   linear | optim | conv-vgg19 | conv-resnet20 | conv-conv6 | model-vgg19 | model-lenet (290 each)
#                         the full sweeps (every layer, density, op, precision, implementation), for later calls
#   memory (290)          bench_memory.py on CUDA: training state and saved activations of LeNet-300-100, Conv-6,
#                         ResNet-20 and VGG-19, and each step's peak allocation, vs dense masking
#   quick (290)           a fast smoke run of linear and conv (--quick) to check that everything compiles
#
# The package is imported from the checkout (PYTHONPATH; no pip install: the device machine has no network, and
# sparse_lth finds its kernels/ beside it in a source checkout). Result CSVs are written under
# benchmarks/results/ with the device named and copied, with one log for the call, to $OUT (when set) so that they
# come back; commit them from there. Each part writes its file anew (a file is one run: summarize.py takes ratios
# within a file), so a part cut short early brings back a shorter file than the one committed: `git diff --stat`
# shows it, commit only what is worth keeping. SPARSE_LTH_COMMIT (set it to `git rev-parse --short=12 HEAD` on the machine
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
    awk 'NR > 1 && /^set -u/ { exit } NR > 1' "$0"   # the header above
    exit 2
fi

DEV=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import torch; from baselines import slug; print(slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)

BUDGET=${SUITE_BUDGET:-540}
START=$(date +%s)
status=0
parts=()
for part in "$@"; do
    if [ "$part" = plan15 ]; then
        parts+=(tests-core ceilings linear-targets optim-targets conv-targets model-vgg19-targets model-lenet-graph)
    else
        parts+=("$part")
    fi
done

default_limit() {
    case "$1" in
        tests-core) echo 150 ;; ceilings|host) echo 30 ;; linear-targets) echo 120 ;; optim-targets) echo 60 ;;
        conv-targets|model-vgg19-targets) echo 90 ;; model-lenet-graph) echo 45 ;; train-loop) echo 60 ;;
        *) echo 290 ;;
    esac
}

copy_results() {  # the result files this call wrote go back through $OUT (flat, at most 7 besides the log)
    if [ -n "${OUT:-}" ]; then
        # counted over the whole call, not per part: files past the 8th do not come back (earlier parts first)
        local have f
        have=$(find "$OUT" -maxdepth 1 -name '*.csv' | wc -l)
        for f in $(find benchmarks/results -maxdepth 1 -name '*.csv' -newer "$MARK" | sort); do
            if [ -e "$OUT/${f##*/}" ] || [ "$have" -lt 7 ]; then
                [ -e "$OUT/${f##*/}" ] || have=$((have + 1))
                cp "$f" "$OUT/"
            else
                echo "=== not brought back (8 files at most): $f" | tee -a "$LOG"
            fi
        done
    fi
}

for part in "${parts[@]}"; do
    log="$LOG"
    left=$(( BUDGET - ($(date +%s) - START) ))
    LIMIT=${PART_LIMIT:-$(default_limit "$part")}
    [ "$LIMIT" -gt $(( left - 5 )) ] && LIMIT=$(( left - 5 ))
    if [ "$LIMIT" -lt 15 ]; then
        echo "=== $part: skipped, ${left} s left of the ${BUDGET} s budget" | tee -a "$log"
        status=3
        continue
    fi
    echo "=== $part  $(date -u +%H:%M:%S)  limit ${LIMIT} s" | tee -a "$log"
    t0=$(date +%s)
    case "$part" in
        tests|tests-core)
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
            $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
            # train() with graphs and the layers first: with --maxfail a systematic failure in one file must not
            # stop the suite before the others have run
            files="tests/test_train.py::test_cuda_graph_training_on_a_gpu tests/test_layers_triton.py tests/test_double_backward.py tests/test_kernels_linear.py tests/test_kernels_conv.py tests/test_optim.py"
            par=""
            if [ "$part" = tests ]; then
                files="$files tests/test_layers.py"
            elif $PY -c "import xdist" 2>/dev/null; then
                par="-n 8"
            fi
            # heuristic configurations only (autotuning every test shape would compile for minutes); the benchmarks
            # check the autotuned kernels against the references
            SPARSE_LTH_AUTOTUNE=0 timeout "$LIMIT" $PY -m pytest -q -p no:cacheprovider --maxfail=20 $par $files \
                2>&1 | tee -a "$log"
            ;;
        ceilings)
            timeout "$LIMIT" $PY benchmarks/bench_ceilings.py --device cuda 2>&1 | tee -a "$log"
            ;;
        linear)
            timeout "$LIMIT" $PY benchmarks/bench_linear_gpu.py --out "benchmarks/results/linear_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        linear-targets)
            SPARSE_LTH_TUNE_MS=5,20 timeout "$LIMIT" $PY benchmarks/bench_linear_gpu.py \
                --shapes 300x784x60 100x300x60 4096x4096x4096 --densities 0.01 0.02 0.05 0.1 0.2 0.5 1 \
                --ops fwd fwd+bwd --impls sparse_triton dense_mask sparse_lth_layer --dtypes fp32 bf16 --warmup 10 --rep 40 \
                --out "benchmarks/results/linear_targets_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        optim)
            timeout "$LIMIT" $PY benchmarks/bench_optim.py --device cuda 2>&1 | tee -a "$log"
            timeout "$LIMIT" $PY benchmarks/bench_optim.py --device cuda --dtype bfloat16 --out "benchmarks/results/optim_bf16_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        optim-targets)
            timeout "$LIMIT" $PY benchmarks/bench_optim.py --device cuda --models vgg19 fc4096 \
                --densities 1 0.2 0.05 0.01 2>&1 | tee -a "$log"
            ;;
        conv-targets)
            timeout "$LIMIT" $PY benchmarks/bench_conv_gpu.py --layers vgg19/conv10-12 vgg19/conv13-16 \
                --densities 0.02 0.01 0.05 0.1 0.2 0.5 1 --directions both --impls triton_sparse dense_mask sparse_lth_layer \
                --warmup 10 --rep 40 \
                --out "benchmarks/results/conv_targets_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        conv-vgg19|conv-resnet20|conv-conv6)
            net=${part#conv-}
            timeout "$LIMIT" $PY benchmarks/bench_conv_gpu.py --layers "$net/" --out "benchmarks/results/conv_${net}_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        model-vgg19)
            timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model vgg19 --batch 128 --device cuda --densities 1.0 0.2 0.05 0.015 2>&1 | tee -a "$log"
            ;;
        model-vgg19-targets)
            SPARSE_LTH_TUNE_MS=5,20 timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model vgg19 --batch 128 \
                --device cuda --densities 0.015 1.0 --out "benchmarks/results/model_step_vgg19_targets_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        host)
            timeout "$LIMIT" $PY benchmarks/bench_host_overhead.py --densities 0.2 0.02 \
                --out "benchmarks/results/host_overhead_${DEV}-host.csv" 2>&1 | tee -a "$log"
            ;;
        train-loop)
            SPARSE_LTH_TUNE_MS=5,20 timeout "$LIMIT" $PY benchmarks/bench_train_loop.py --device cuda --iterations 300 \
                --repeats 3 --out "benchmarks/results/train_loop_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        model-lenet-graph)
            SPARSE_LTH_TUNE_MS=5,20 timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model lenet300_100 --batch 60 \
                --device cuda --densities 0.02 0.1 1.0 --cuda-graph \
                --out "benchmarks/results/model_step_lenet_graph_${DEV}.csv" 2>&1 | tee -a "$log"
            ;;
        model-lenet)
            timeout "$LIMIT" $PY benchmarks/bench_model_step.py --model lenet300_100 --batch 60 --device cuda 2>&1 | tee -a "$log"
            ;;
        memory)
            timeout "$LIMIT" $PY benchmarks/bench_memory.py --device cuda 2>&1 | tee -a "$log"
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
    copy_results
done
rm -f "$MARK"
exit $status
