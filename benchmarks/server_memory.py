"""The served default model's memory: RSS after start-up, at its peak during each round of
requests, and after each round; each as resident total = anonymous + file-backed.

    python -m benchmarks.server_memory [--rounds 3] [--requests 100] [--concurrency 16]
        [-- server flags...]

Starts `gemma_serve.server.cli` on a free port, waits for /health (RSS "at ready") and for the
compiled decode layers (loaded from a child's compile ~10-20 s later: "after start-up"), then
sends rounds of completions (greedy, 32 tokens; prompts of 5-300 words cut from Python's own
documentation, `pydoc_data.topics`, so that they meet the vocabulary English text meets) and
samples VmRSS every 20 ms (docs/RELIABILITY.md, "Memory").

File-backed pages are the int8 weights' plain rows served from the conversion cache's map
(model/int8_cache.py) and the libraries' code: clean pages the kernel can reclaim. The
anonymous part is what the process holds for itself (packed weights, KV cache, heaps).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# The engine's log lines that end the compiled layers' wait, either way.
COMPILED, EAGER = "compiled decode layers ready", "decode layers run eagerly"


@dataclass(frozen=True)
class Rss:
    """MiB resident: total, anonymous, file-backed."""

    total: float
    anon: float
    file: float

    def __str__(self) -> str:
        return f"{self.total:,.0f} MiB ({self.anon:,.0f} anonymous + {self.file:,.0f} file)"


def rss(pid: int) -> Rss:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    if "VmRSS" not in fields:
        raise RuntimeError(f"process {pid} has no VmRSS (exited?)")
    return Rss(fields["VmRSS"], fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(url: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["usage"]["completion_tokens"]


def english_words() -> list[str]:
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics.values()).split()


class PeakSampler:
    """The highest VmRSS of a process while running (a thread sampling every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = rss(self.pid)
            if now.total > self.peak.total:
                self.peak = now

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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
    with tempfile.NamedTemporaryFile("w+", prefix="server-memory-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            measure(proc, Path(log.name), f"http://127.0.0.1:{port}", args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def measure(proc: subprocess.Popen, log: Path, base: str, args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/health", timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    print(f"ready in {time.monotonic() - t0:.1f} s: RSS {rss(proc.pid)}")
    while COMPILED not in (text := log.read_text()) and EAGER not in text:
        if time.monotonic() - t0 > 300:
            raise SystemExit("the compiled decode layers did not come within 300 s")
        time.sleep(0.2)
    time.sleep(1.0)
    print(f"after start-up ({time.monotonic() - t0:.1f} s): RSS {rss(proc.pid)}")
    rng = random.Random(0)
    words = english_words()
    for k in range(args.rounds):
        prompts = []
        for _ in range(args.requests):
            n = rng.randint(5, 300)
            start = rng.randrange(len(words) - n)
            prompts.append(" ".join(words[start : start + n]))
        with PeakSampler(proc.pid) as peak, cf.ThreadPoolExecutor(args.concurrency) as ex:
            n = sum(
                ex.map(lambda p: complete(base + "/v1/completions", p, args.max_tokens), prompts)
            )
        time.sleep(1.0)  # the engine goes idle after the last response is sent
        done = args.requests * (k + 1)
        print(
            f"after {done} requests ({n} tokens this round): RSS {rss(proc.pid)}; "
            f"peak during the round {peak.peak}"
        )


if __name__ == "__main__":
    main()
