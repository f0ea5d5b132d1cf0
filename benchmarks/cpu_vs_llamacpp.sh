#!/usr/bin/env bash
# Side by side on one CPU machine: llama-cpp-python's OpenAI server vs gemma-serve, both on the
# embedded default model's GGUF (Gemma 3 270M Q4_K_M), same workload, one server at a time
# (llama.cpp's idle threads spin and would slow the other). With LLAMA_SERVER set, llama.cpp's
# own llama-server (continuous batching, 8 slots, flash attention) runs the workload too.
#
#   LLAMA_PY=/tmp/llama-venv/bin/python [LLAMA_SERVER=.../llama-server] \
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

bench() {  # name port
    for c in "${CONCURRENCIES[@]}"; do
        "$PY" -m benchmarks.serve --base-url "http://127.0.0.1:$2" \
            --prompts-file "$OUT/prompts.jsonl" --concurrency "$c" --no-progress \
            --extra-body '{"logit_bias": {"1": -100, "106": -100}}' \
            --out "$OUT/$1-c$c.json" | tee "$OUT/$1-c$c.txt"
    done
}

serve_and_bench() {  # name port ready-path command...: start a server, run the workload, stop it
    local name=$1 port=$2 ready=$3
    shift 3
    "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$port$ready"
    bench "$name" "$port"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

SYSTEMS=(llama-cpp-python gemma-serve)
if [ -n "${LLAMA_SERVER:-}" ]; then
    SYSTEMS=(llama-cpp-python llama-server gemma-serve)
    serve_and_bench llama-server 8103 /v1/models "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 \
        --port 8103 -t "$(nproc)" -np 8 -c 8192 -fa on
fi
serve_and_bench llama-cpp-python 8101 /v1/models "$LLAMA_PY" -m llama_cpp.server --model "$GGUF" \
    --host 127.0.0.1 --port 8101 --n_ctx 4096 --n_threads "$(nproc)" --interrupt_requests False
serve_and_bench gemma-serve 8102 /health .venv/bin/gemma-serve --port 8102

"$PY" - "$OUT" "${SYSTEMS[*]}" "${CONCURRENCIES[@]}" <<'EOF'
import json, sys
out, systems, concs = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
peers = systems[:-1]
print(f"output tok/s; ratio = gemma-serve / peer\n{'concurrency':>11}", *(f"{n:>17}" for n in systems),
      *(f"{'vs ' + n:>21}" for n in peers))
for c in concs:
    tput = {n: json.load(open(f"{out}/{n}-c{c}.json"))["runs"][0]["summary"]["output_throughput"]
            for n in systems}
    print(f"{c:>11}", *(f"{tput[n]:>17.1f}" for n in systems),
          *(f"{tput['gemma-serve'] / tput[n]:>21.2f}" for n in peers))
EOF
