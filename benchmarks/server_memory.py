"""The served default model's RSS after start-up and after every round of requests.

    python -m benchmarks.server_memory [--rounds 3] [--requests 100] [-- server flags...]

Starts `gemma_serve.server.cli` on a free port, waits for /health, then sends rounds of
completions (5-300 random common words, 32 tokens, 16 at a time) and prints the server
process's VmRSS after each round (docs/RELIABILITY.md, "Memory").
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request

WORDS = "the cat sat on a mat and then ran over to see what the dog was doing in the garden"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (exited?)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(url: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["usage"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("server_args", nargs="*")
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "gemma_serve.server.cli", "--port", str(port), *args.server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                urllib.request.urlopen(base + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        print(f"ready in {time.monotonic() - t0:.1f} s, RSS {rss_mib(proc.pid):.0f} MiB")
        rng = random.Random(0)
        words = WORDS.split()
        for k in range(args.rounds):
            prompts = [
                " ".join(rng.choice(words) for _ in range(rng.randint(5, 300)))
                for _ in range(args.requests)
            ]
            with cf.ThreadPoolExecutor(args.concurrency) as ex:
                n = sum(
                    ex.map(
                        lambda p: complete(base + "/v1/completions", p, args.max_tokens), prompts
                    )
                )
            time.sleep(1.0)  # the engine goes idle after the last response is sent
            done = args.requests * (k + 1)
            print(f"after {done} requests ({n} tokens this round): RSS {rss_mib(proc.pid):.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
