#!/usr/bin/env bash
# GPU benchmark for one NVIDIA H200, in at most 9 minutes (GPU_BENCH_BUDGET_S, default 540):
#   0. installs the web-stack wheels of .gpu/whl when present (the GPU image lacks fastapi & co.)
#   1. device copy bandwidth (for the decode roofline)
#   2. the GPU tests (tests/test_kernels.py, test_kernels_e2e.py, test_cuda_graphs.py on CUDA)
#   3. benchmarks/kernels.py: every kernel and its tile variants, flex_attention, copy roofline
#   4. for gemma-2-9b then gemma-2-2b (--load-format dummy --dtype bfloat16): start gemma-serve,
#      single-stream decode (concurrency 1, input 128, output 256), then throughput at
#      concurrency 1, 16, 64, 256 (input 512, output 256) with benchmarks/serve.py
#   5. only with more than one GPU: the same for gemma-2-9b and gemma-2-27b at
#      --tensor-parallel-size 1/2/4/8 (up to the GPU count)
# Every phase runs under `timeout`, capped by what is left of the budget (phases that no longer
# fit are skipped); a failing phase is recorded and the script goes on. Ends with the summary
# tables (kernels, decode vs roofline, throughput per concurrency, phases).
#
# Prepare on the CPU machine first (wheels and preset directories, ~18 MiB, git-ignored):
#   python -m benchmarks.gpu_prep          # writes .gpu/
# then on the GPU machine (device tool: carry [".gpu"], timeout_s ~590; the tool brings back
# at most 8 files, so ask for the archive):
#   benchmarks/gpu.sh /tmp/gpu "$OUT/gpu.tar.gz"
#
# RESULTS_DIR gets: phases.tsv, summary.{json,txt}, bandwidth.json, kernels.json, logs/*.log
# (logs/<preset>_start.log is the server's) and <preset>/{decode,sweep}.json; ARCHIVE, when
# given, is a .tar.gz of all of it.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 RESULTS_DIR [ARCHIVE.tar.gz]" >&2
    exit 2
fi
ARCHIVE=""
if [[ $# -eq 2 ]]; then
    mkdir -p "$(dirname "$2")" && ARCHIVE="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")" || exit 2
fi
BUDGET_S=${GPU_BENCH_BUDGET_S:-540}
RESERVE_S=20          # kept back for stopping a server and printing the report
PORT=${GPU_BENCH_PORT:-18080}
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2

if [[ -n ${GPU_BENCH_PYTHON:-} ]]; then # another interpreter (e.g. to try the script here)
    PY=$GPU_BENCH_PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if [[ -n ${GPU_BENCH_SERVER:-} ]]; then # another server command (e.g. a stub, to try the script)
    read -r -a SERVE <<<"$GPU_BENCH_SERVER"
elif [[ -x .venv/bin/gemma-serve ]]; then
    SERVE=(.venv/bin/gemma-serve)
elif command -v gemma-serve >/dev/null; then
    SERVE=(gemma-serve)
else
    SERVE=("$PY" -m gemma_serve.server.cli)
fi
SERVER_PID=""
printf 'phase\tstatus\tseconds\n' >"$OUT/phases.tsv"
SITE=/tmp/gemma-serve-site # the carried wheels go here, ahead of the image's packages

log() { echo "[gpu.sh ${SECONDS}s] $*" >&2; }

# phase_limit WANTED_S: WANTED_S capped by the budget left (0 when too little is left).
phase_limit() {
    local left=$((BUDGET_S - RESERVE_S - SECONDS))
    if ((left < 10)); then
        echo 0
    elif (($1 < left)); then
        echo "$1"
    else
        echo "$left"
    fi
}

# record NAME RC LIMIT START: appends the phase's outcome to phases.tsv.
record() {
    local status=ok
    if (($2 == 124 || $2 == 137)); then
        status="timeout(${3}s)"
    elif (($2 == 125)); then
        status="skipped(no time left)"
    elif (($2 != 0)); then
        status="failed(rc=$2)"
    fi
    printf '%s\t%s\t%s\n' "$1" "$status" "$((SECONDS - $4))" >>"$OUT/phases.tsv"
    log "$1: $status"
}

# run_phase NAME WANTED_S CMD...: CMD under `timeout`, output in logs/NAME.log.
run_phase() {
    local name=$1 start=$SECONDS limit rc
    limit=$(phase_limit "$2")
    shift 2
    if ((limit == 0)); then
        record "$name" 125 0 "$start"
        return 125
    fi
    log "$name (at most ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    record "$name" "$rc" "$limit" "$start"
    return "$rc"
}

# wait_healthy URL PID LIMIT_S: polls URL/health until 200; 2 if the server exited, 124 on timeout.
wait_healthy() {
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        kill -0 "$2" 2>/dev/null || return 2
        if "$PY" -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)' \
            "$1/health" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    return 124
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    local i
    for ((i = 0; i < 30; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# bench_model PRESET PORT START_S DECODE_S SWEEP_S [NAME [SERVER_FLAGS...]]
# NAME (default PRESET) names the phases and the results folder.
bench_model() {
    local preset=$1 url="http://127.0.0.1:$2" start=$SECONDS limit rc model=("--model" "$1")
    local name=${6:-$1}
    local extra=("${@:7}")
    if [[ -f .gpu/models/$preset/config.json ]]; then # prepared by benchmarks/gpu_prep.py
        model=(--model ".gpu/models/$preset" --served-model-name "$preset")
    fi
    mkdir -p "$OUT/$name"
    limit=$(phase_limit "$3")
    if ((limit == 0)); then
        record "${name}_start" 125 0 "$start"
        return
    fi
    log "${name}_start (at most ${limit}s)"
    "${SERVE[@]}" "${model[@]}" --load-format dummy --dtype bfloat16 --port "$2" \
        --max-num-seqs 256 "${extra[@]}" >"$OUT/logs/${name}_start.log" 2>&1 &
    SERVER_PID=$!
    wait_healthy "$url" "$SERVER_PID" "$limit"
    rc=$?
    record "${name}_start" "$rc" "$limit" "$start"
    if ((rc == 0)); then
        local bench=("$PY" benchmarks/serve.py --base-url "$url" --no-progress --timeout 150)
        run_phase "${name}_decode" "$4" "${bench[@]}" --concurrency 1 --num-prompts 4 \
            --input-len 128 --output-len 256 --warmup-requests 2 --out "$OUT/$name/decode.json"
        run_phase "${name}_sweep" "$5" "${bench[@]}" --sweep-concurrency 1,16,64,256 \
            --num-prompts 2,16,64,256 --input-len 512 --output-len 256 --warmup-requests 2 \
            --out "$OUT/$name/sweep.json"
    fi
    stop_server
}

log "results in $OUT; budget ${BUDGET_S}s; server: ${SERVE[*]}"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    run_phase wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
run_phase bandwidth 30 "$PY" benchmarks/gpu_report.py bandwidth --out "$OUT/bandwidth.json"
XDIST=() # Triton compiles each test's kernels anew: spread them over the cores when possible
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
run_phase kernel_tests 150 env GEMMA_SERVE_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider \
    "${XDIST[@]}" tests/test_kernels.py tests/test_kernels_e2e.py tests/test_cuda_graphs.py
run_phase kernels 180 "$PY" benchmarks/kernels.py --out "$OUT/kernels.json"
# 9B first: its single-stream decode against the roofline is the open number.
bench_model gemma-2-9b "$PORT" 120 60 120
bench_model gemma-2-2b "$((PORT + 1))" 90 45 100
# Tensor parallelism, only where there is more than one GPU: 9B and 27B at TP 1/2/4/8 (as many
# as there are GPUs; results in <preset>_tp<N>/; the roofline column is one GPU's).
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if ((NGPU > 1)); then
    for preset in gemma-2-9b gemma-2-27b; do
        for tp in 1 2 4 8; do
            ((tp <= NGPU)) || continue
            bench_model "$preset" "$((PORT + 10 + tp))" 240 45 100 "${preset}_tp$tp" \
                --tensor-parallel-size "$tp"
        done
    done
else
    log "tensor parallelism: skipped (${NGPU} GPU)"
fi

# The end of the log of each phase that did not succeed (the server's log for a failed start).
while IFS=$'\t' read -r name status _; do
    if [[ $status != ok && $status != skipped* && -f $OUT/logs/$name.log ]]; then
        echo "--- $name: $status; last lines of logs/$name.log:"
        tail -n 8 "$OUT/logs/$name.log"
    fi
done < <(tail -n +2 "$OUT/phases.tsv")
echo "--- kernel tests: $(tail -n 1 "$OUT/logs/kernel_tests.log" 2>/dev/null)"
echo "--- kernels (benchmarks/kernels.py):"
sed -n '/^op /,$p' "$OUT/logs/kernels.log" 2>/dev/null | grep -E '^(op|prefill|decode|store_kv) '
echo
"$PY" benchmarks/gpu_report.py summary "$OUT" | tee "$OUT/summary.txt"
if [[ -n $ARCHIVE ]]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && log "archive: $ARCHIVE"
fi
log "done"
