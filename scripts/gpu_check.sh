#!/usr/bin/env bash
# The GPU path's device script: everything that needs a real GPU, in one command of <= 8 min.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a one-GPU machine
#
# Expects Python 3.12+, NumPy 2, CuPy for the machine's CUDA and a CUDA PyTorch already
# installed, and no internet: pure-Python wheels the environment lacks (array-api-compat,
# array-api-strict) may sit in .whl/ beside it. Each stage has its own time limit and log under
# $OUT (default ./gpu_check_out); the last screen is the summary: pass/fail per stage and the
# bench's figures.
set -u
OUT=${OUT:-$PWD/gpu_check_out}
WORK=$(mktemp -d)
LOGS="$WORK/logs"              # one log per stage; packed into $OUT/logs.tgz at the end
mkdir -p "$OUT" "$LOGS"
DEADLINE=${DEADLINE:-470}      # seconds for the whole script: stages are cut to fit it
STAGES=${STAGES:-}             # e.g. "tests parity bench": only these (default: all)
case ${PRESET:-} in            # named sets of stages, for a session with little device time
    graphs) STAGES="install start graphs default_run evaluate_graphs bench_graphs loader";;
    half) STAGES="install start parity_half trace gemm matmuls bench_half";;
    # the open questions in one run: graphs' checks and speed, then where bf16 goes wrong
    next) STAGES="install start capture graphs default_run evaluate_graphs bench_graphs loader parity_half trace";;
    # then half precision: is bf16 right now, and is a replayed half step faster than float32?
    half_graphs) STAGES="install start parity_half trace bench_half_graphs matmuls";;
    # two short runs: does a step record (capture's tests, graphs' comparisons)? then its speed
    recording) STAGES="install start capture graphs";;
    graphs_speed) STAGES="install start default_run evaluate_graphs bench_graphs parity_half bench_half_graphs";;
    "") ;;
    *) echo "PRESET must be graphs, half, next, half_graphs, recording or graphs_speed"; exit 2;;
esac
# TESTS_K (pytest -k, default "cupy") and BENCH_CONFIGS narrow the tests and bench stages
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

stage() {  # stage NAME SECONDS [ok=CODE] COMMAND...: run with a limit, log to $LOGS/NAME.log
    local name=$1 limit=$2; shift 2
    if [ -n "$STAGES" ] && [[ " $STAGES " != *" $name "* ]]; then return 0; fi
    local ok=0
    case $1 in ok=*) ok=${1#ok=}; shift;; esac
    local t0=$(date +%s)
    local left=$(( DEADLINE - (t0 - START) - 10 ))
    if [ $left -lt 15 ]; then
        printf '%-11s %-28s\n' "$name" "SKIPPED (no time left)" >> "$SUMMARY"; return 99
    fi
    [ $limit -gt $left ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/all.log"
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    tail -n 25 "$LOGS/$name.log" | tee -a "$OUT/all.log"
    local verdict=PASS
    [ $rc -ne 0 ] && [ $rc -ne $ok ] && verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
    printf '%-11s %-28s %4ss\n' "$name" "$verdict" "$dt" >> "$SUMMARY"
    return $rc
}

# 0. the machine
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, numpy, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())"
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
  nproc; } > "$LOGS/machine.log" 2>&1
cat "$LOGS/machine.log"

# 1. install: wheels the image lacks, then the project itself without dependencies
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl \
        > "$LOGS/wheels.log" 2>&1 && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
stage install 90 $PY -m pip install --no-deps --no-build-isolation --no-index -e . \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage start 60 $PY -c "import t2t_ref; m = t2t_ref.create_model('t2t_vit_7', num_classes=10, img_size=32, backend='cupy'); print('built on', m.device)"

# 2. the CuPy tests: every test parametrised over backends (cupy cases only), and the
#    kernels against their plain twins (tests/test_cupy_kernels.py)
stage tests 150 $PY -m pytest -q --maxfail=10 -p no:cacheprovider -k "${TESTS_K:-cupy}" --continue-on-collection-errors tests

# 3. float32 CuPy against NumPy: logits, d(input) and every gradient, six variants
stage parity 90 $PY scripts/gpu_parity.py

# 4. 300 training steps on the built-in shapes, stopped at 150, resumed, evaluated
RUN="$WORK/run"
TRAIN="$PY -m t2t_ref.train --backend cupy --synthetic-train 6400 --synthetic-val 1000 --epochs 3 --out $RUN"
stage train 120 ok=130 $TRAIN --stop-after 150  # 130: stopped as Ctrl-C would, last saved
stage resume 120 $TRAIN --resume "$RUN/last.safetensors"
stage evaluate 60 $PY -m t2t_ref.evaluate --backend cupy --checkpoint "$RUN/best.safetensors"
cp "$RUN"/metrics.jsonl "$LOGS/" 2>/dev/null

# 5. bench against PyTorch CUDA at 224, batch 64 (t2t_ref's steps replayed as CUDA graphs, as
#    train runs them; PyTorch eager)
BENCH_CONFIGS=${BENCH_CONFIGS:-"t2t_vit_7-224-b64-train t2t_vit_7-224-b64-infer
    t2t_vit_14-224-b64-train t2t_vit_14-224-b64-infer"}
stage bench 200 $PY -m t2t_ref.bench --backend cupy --repeats 7 --warmup 2 --json "$LOGS/bench.json" \
    $(for c in $BENCH_CONFIGS; do echo --config $c; done)

# The stages above are the GPU issue's whole check; those below measure more, in the time left
# (DEADLINE cuts them first).

# 6. the default built-in training run (3 epochs of 40,000 images), end to end (its steps
#    replayed as CUDA graphs: the default on CuPy)
stage default_run 100 $PY -m t2t_ref.train --backend cupy --out "$WORK/default"

#    and its step alone against PyTorch's, with the per-op profile: what bounds the 32x32
#    step (no target of its own, so a miss is not a failure here; parity still prints)
stage bench_small 60 ok=1 $PY -m t2t_ref.bench --backend cupy --repeats 7 --warmup 2 \
    --json "$LOGS/bench_small.json" --config t2t_vit_7-32-b64-train

# 6b. --cuda-graphs (t2t_ref/graphs.py): replayed steps against eager ones, and their speed
#     (gpu_graphs.py); the default run again, eagerly; the 32x32 step and T2T-ViT-7's
#     inference against PyTorch eager, replayed (bench: a missed target is not a failure here)
#     (first the unit tests of recording: products into a graph through cuBLAS by ctypes, the
#     kernels' twins, the replayed steps' GPU test)
stage capture 90 $PY -m pytest -q -p no:cacheprovider tests/test_cupy_gemm.py tests/test_graphs.py -k "cupy or gpu or graph"
stage graphs 90 $PY scripts/gpu_graphs.py
stage default_eager 120 $PY -m t2t_ref.train --backend cupy --no-cuda-graphs --out "$WORK/default_eager"
#     (the default run's checkpoint evaluated eagerly, then with the forward replayed: the same
#     numbers)
BEST="$WORK/default/best.safetensors"
stage evaluate_graphs 60 sh -c "$PY -m t2t_ref.evaluate --backend cupy --no-cuda-graphs --checkpoint $BEST && $PY -m t2t_ref.evaluate --backend cupy --cuda-graphs --checkpoint $BEST"
stage bench_graphs 100 ok=1 $PY -m t2t_ref.bench --backend cupy --cuda-graphs --repeats 7 --warmup 2 \
    --json "$LOGS/bench_graphs.json" --config t2t_vit_7-32-b64-train --config t2t_vit_7-224-b64-infer

# 7. the loader at 224 with the recipe's augmentation: images/s for 1, 2 and all cores
stage loader 60 $PY -m t2t_ref.bench --loader --json "$LOGS/loader.json"

# 8. mixed precision: the bf16 and fp16 policies on the GPU against NumPy's float32 (the
#    policy's tolerances); attention's q k^T through CuPy's matmul and through one cuBLAS call;
#    then T2T-ViT-14 at 224, batch 64, bf16 and fp16 eager steps against torch.autocast
#    (issue 13's targets: >= 1.8x faster than t2t_ref's own float32 step, <= 1.2x autocast's:
#    met replayed, the default since, in bench_half_graphs; missed eagerly)
#    (each precision runs whatever the other's verdict; the stage fails if either does)
stage parity_half 90 sh -c "$PY scripts/gpu_parity.py --precision bf16 --variants t2t_vit_7 t2t_vit_t_14; a=\$?; $PY scripts/gpu_parity.py --precision fp16 --variants t2t_vit_7 t2t_vit_t_14; exit \$((a | \$?))"
#    where a half-precision model first parts ways with NumPy's, op by op (gpu_trace.py)
stage trace 60 sh -c "$PY scripts/gpu_trace.py --variant t2t_vit_t_14 --precision bf16; $PY scripts/gpu_trace.py --variant t2t_vit_t_14 --precision fp16"
stage gemm 40 $PY scripts/gpu_gemm.py
#    every product of one T2T-ViT-14 step (224, batch 64), timed beside torch.matmul on the same
#    memory: which products make the half-precision step slow (gpu_matmuls.py)
stage matmuls 120 sh -c "for p in fp16 bf16 float32; do $PY scripts/gpu_matmuls.py --precision \$p; done"
stage bench_half 150 sh -c "$PY -m t2t_ref.bench --backend cupy --no-cuda-graphs --precision bf16 --repeats 5 --warmup 2 --json $LOGS/bench_bf16.json --config t2t_vit_14-224-b64-train; a=\$?; $PY -m t2t_ref.bench --backend cupy --no-cuda-graphs --precision fp16 --repeats 5 --warmup 2 --json $LOGS/bench_fp16.json --config t2t_vit_14-224-b64-train; exit \$((a | \$?))"

#    the same steps replayed (--cuda-graphs): at 224 the eager half-precision step ran 71-110 ms
#    against autocast's 50-61, moving with the host (launch-bound once the products are fast)
stage bench_half_graphs 150 ok=1 sh -c "$PY -m t2t_ref.bench --backend cupy --cuda-graphs --precision bf16 --repeats 5 --warmup 2 --json $LOGS/bench_bf16_graphs.json --config t2t_vit_14-224-b64-train; a=\$?; $PY -m t2t_ref.bench --backend cupy --cuda-graphs --precision fp16 --repeats 5 --warmup 2 --json $LOGS/bench_fp16_graphs.json --config t2t_vit_14-224-b64-train; exit \$((a | \$?))"

# 9. the plain ops on CuPy (kernels off), for the kernels' share of the speed
stage bench_plain 90 env T2T_REF_PLAIN_OPS=1 $PY -m t2t_ref.bench --backend cupy --repeats 5 \
    --warmup 2 --json "$LOGS/bench_plain.json" \
    --config t2t_vit_7-224-b64-train --config t2t_vit_14-224-b64-train

tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null; cp "$LOGS/bench.json" "$OUT/" 2>/dev/null
echo
echo "================ summary ($(( $(date +%s) - START )) s) ================"
head -n 3 "$LOGS/machine.log"
cat "$SUMMARY"
grep -h -E "PASS|FAIL|^speed|recording failed" "$LOGS/parity.log" "$LOGS/parity_half.log" \
    "$LOGS/gemm.log" "$LOGS/graphs.log" 2>/dev/null
grep -h -E "against numpy|against itself|against NumPy|^  (call|without|every|as it is)" "$LOGS/trace.log" 2>/dev/null
grep -h -A6 -E " products in " "$LOGS/matmuls.log" 2>/dev/null; grep -h "^per step" "$LOGS/matmuls.log" 2>/dev/null
{ tr "\r" "\n" < "$LOGS/resume.log"; } 2>/dev/null | grep -E "^epoch [0-9]+:|^done" | tail -n 3
echo "-- evaluate_graphs (one checkpoint, eager then replayed: the same numbers expected)"
grep -h '^{"loss"' "$LOGS/evaluate_graphs.log" 2>/dev/null | cut -c1-90
for b in bench bench_small bench_graphs bench_half bench_half_graphs bench_plain; do
    echo "-- $b"
    grep -h -E "^== |agree|against float32|ms per step|peak memory|FAILED" "$LOGS/$b.log" 2>/dev/null
done
echo "-- loader"
grep -h -E "worker|share" "$LOGS/loader.log" 2>/dev/null
for run in default_run default_eager; do
    echo "-- $run"
    { tr "\r" "\n" < "$LOGS/$run.log"; } 2>/dev/null | grep -E "^epoch [0-9]+:|^done|^time:|^note" | tail -n 5
done
