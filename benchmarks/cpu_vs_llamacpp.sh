#!/usr/bin/env bash
# Side by side on one CPU machine: llama-cpp-python's OpenAI server vs gemma-serve, both on the
# embedded default model's GGUF (Gemma 3 270M Q4_K_M), same workload, one server at a time
# (llama.cpp's idle threads spin and would slow the other). With LLAMA_SERVER set, llama.cpp's
# own llama-server (continuous batching, one slot per concurrent request, flash attention) runs
# the workload too. Every server is started fresh for each concurrency and warmed (8 short
# unmeasured requests, and gemma-serve's decode layers compiled) before the measured run.
# GEMMA_ARGS adds gemma-serve flags (e.g.
# "--quantization none" for the exact fp32 path); ONLY_GEMMA=1 runs gemma-serve alone.
#
#   LLAMA_PY=/tmp/llama-venv/bin/python [LLAMA_SERVER=.../llama-server] [GEMMA_ARGS=...] \
#       benchmarks/cpu_vs_llamacpp.sh OUT_DIR [CONCURRENCY...]
#
# LLAMA_PY: a Python with `pip install 'llama-cpp-python[server]'` (not a project dependency).
# LLAMA_SERVER: a llama-server binary built from the llama.cpp that llama-cpp-python vendors
# (`cmake -B build && cmake --build build --target llama-server` in its vendor/llama.cpp).
# Workload: 32 prompts of 20-300 tokens (random common words, seeded), 64 output tokens each,
# greedy, EOS banned (logit_bias on <eos> and <end_of_turn>; gemma-serve also gets ignore_eos).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/cpu_vs_llamacpp.sh OUT_DIR [CONCURRENCY...]}
shift
CONCURRENCIES=("${@:-32}")
PY=.venv/bin/python
LLAMA_PY=${LLAMA_PY:-/tmp/llama-venv/bin/python}
mkdir -p "$OUT"

GGUF=$("$PY" -c 'from gemma_serve.model.default_model import default_model_dir as d; d()
from gemma_serve.model.gguf_convert import cache_root; print(next((cache_root() / "gguf").glob("*.gguf")))')
"$PY" - "$OUT/prompts.jsonl" <<'EOF'
import json, random, sys
from gemma_serve.model.default_model import default_model_dir
from gemma_serve.model.tokenizer import Tokenizer
tok = Tokenizer.from_file(default_model_dir() / "tokenizer.model")
words = ("the of and to in is was for on that with as by at from his her their this which river "
         "mountain city history music science language market winter summer garden engine village "
         "ocean forest library museum painter writer theory storm bridge railway kingdom island "
         "harbor festival").split()
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(32):
        target, text = rng.randint(20, 300), ""
        while len(tok.encode(text)) < target:
            text += rng.choice(words) + " "
        f.write(json.dumps({"prompt": text.rstrip(), "max_tokens": 64}) + "\n")
EOF

wait_ready() {  # url
    for _ in $(seq 1 180); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "server at $1 did not become ready" >&2
    return 1
}

serve_and_bench() {  # name concurrency port ready-path command...: fresh server, warm, measure
    local name=$1 c=$2 port=$3 ready=$4
    shift 4
    "$@" >"$OUT/$name-c$c.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$port$ready"
    if [ "$name" = gemma-serve ]; then  # warmed includes its compiled decode layers (or why not)
        for _ in $(seq 1 120); do
            grep -q "compiled decode layers ready\|decode layers run eagerly\|compiling the decode" \
                "$OUT/$name-c$c.log" && break
            sleep 1
        done
    fi
    "$PY" -m benchmarks.serve --base-url "http://127.0.0.1:$port" \
        --prompts-file "$OUT/prompts.jsonl" --concurrency "$c" --no-progress \
        --warmup-requests 8 --extra-body '{"logit_bias": {"1": -100, "106": -100}}' \
        --out "$OUT/$name-c$c.json" | tee "$OUT/$name-c$c.txt"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

"$PY" -m benchmarks.cpu_info | tee "$OUT/cpu.txt"
SYSTEMS=(llama-cpp-python gemma-serve)
[ -n "${LLAMA_SERVER:-}" ] && SYSTEMS=(llama-cpp-python llama-server gemma-serve)
[ -n "${ONLY_GEMMA:-}" ] && SYSTEMS=(gemma-serve)  # gemma-serve alone (e.g. before / after)
runs() { [[ " ${SYSTEMS[*]} " == *" $1 "* ]]; }  # is system $1 in this run
for c in "${CONCURRENCIES[@]}"; do
    if runs llama-server; then  # one slot per request, 512 tokens of context each
        serve_and_bench llama-server "$c" 8103 /v1/models "$LLAMA_SERVER" -m "$GGUF" \
            --host 127.0.0.1 --port 8103 -t "$(nproc)" -np "$c" -c $((512 * c)) -fa on
    fi
    if runs llama-cpp-python; then
        serve_and_bench llama-cpp-python "$c" 8101 /v1/models "$LLAMA_PY" -m llama_cpp.server \
            --model "$GGUF" --host 127.0.0.1 --port 8101 --n_ctx 4096 --n_threads "$(nproc)" \
            --interrupt_requests False
    fi
    # shellcheck disable=SC2086
    serve_and_bench gemma-serve "$c" 8102 /health .venv/bin/gemma-serve --port 8102 ${GEMMA_ARGS:-}
done

"$PY" - "$OUT" "${SYSTEMS[*]}" "${CONCURRENCIES[@]}" <<'EOF'
import json, sys
out, systems, concs = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
peers = systems[:-1]
print(f"output tok/s; ratio = gemma-serve / peer\n{'concurrency':>11}", *(f"{n:>17}" for n in systems),
      *(f"{'vs ' + n:>21}" for n in peers))
summary = {c: {n: json.load(open(f"{out}/{n}-c{c}.json"))["runs"][0]["summary"] for n in systems}
           for c in concs}
for c in concs:
    tput = {n: summary[c][n]["output_throughput"] for n in systems}
    print(f"{c:>11}", *(f"{tput[n]:>17.1f}" for n in systems),
          *(f"{tput['gemma-serve'] / tput[n]:>21.2f}" for n in peers))
print("\nlatency ms: TTFT p50 / p99, TPOT p50 / p99")
for c in concs:
    for n in systems:
        s = summary[c][n]
        print(f"{c:>11} {n:>17}", *(f"{s[k][p]:>9.1f}" for k in ("ttft_ms", "tpot_ms")
                                       for p in ("p50", "p99")))
EOF
