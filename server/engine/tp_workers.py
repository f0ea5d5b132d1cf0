"""Tensor parallelism's processes: rank 0's handle on the other ranks, and their loop (torch).

Rank 0 is the server process: it holds the scheduler, the KV bookkeeping and the sampler, and
each step sends its ModelBatch to the other ranks (tp_wire.py) before running its own shard;
the ranks meet in the model's all-reduces and the LM head's gather (model/parallel.py).

- `launch(config)` (rank 0): starts this machine's other ranks as child processes, joins the
  group, loads its own shard, and waits for every rank's start-up result; a rank that failed
  is reported with its message. Returns rank 0's LoadedModel, whose `workers` is the
  `WorkerGroup`.
- `WorkerGroup` (the runner's executor on rank 0): sends each step, runs rank 0's forward, and
  turns any failure of the group (a rank that died, hung past the timeout, or raised) into
  EngineDeadError: the ranks can no longer be in step, so the engine stops (llm_engine.py).
- `run_worker` (every other rank): load the shard, build the KV cache rank 0 sized, then run
  each step it is sent until told to stop. Any error ends the process (non-zero), which fails
  rank 0's next collective at once.
Child processes exit when their parent is gone, so no rank outlives the process that
started it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gemma_serve.kernels.dispatch import select_ops
from gemma_serve.server.engine import host_memory, model_source, tp_wire
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.errors import EngineDeadError
from gemma_serve.server.engine.kv_cache import CacheLayout, KVCache
from gemma_serve.server.engine.runner import ForwardOutput, ModelBatch, Runner
from gemma_serve.server.engine.tp_group import (
    START_TIMEOUT_S,
    STATUS_KEY,
    DistributedInit,
    Groups,
    connect,
)

log = logging.getLogger(__name__)

STOP_JOIN_S = 10.0  # a rank still running this long after the stop message is killed
STATUS_POLL_S = 0.05
EXIT_WAIT_S = 1.0  # after a failed step: how long a dead local rank may take to be seen
PARENT_POLL_S = 0.5
PARENT_ENV = "GEMMA_SERVE_PARENT_PID"  # a child rank checks its parent is still this one
THREADS_ENV = "GEMMA_SERVE_RANK_THREADS"
# Not `-m` (runpy would import this module a second time, as __main__).
CHILD_MAIN = "import sys; from gemma_serve.server.engine.tp_workers import main; sys.exit(main())"


class WorkerGroup:
    """Rank 0's executor: every step goes to all ranks; a failure of any stops the engine."""

    def __init__(self, groups: Groups, children: dict[int, subprocess.Popen], threads: int) -> None:
        self.groups, self.children = groups, children
        self._threads = threads  # rank 0's thread count before it took its share
        self.failure: str | None = None
        self._stopped = False

    def start(self, layout: CacheLayout) -> None:
        """The other ranks build their KV caches (rank 0 sized them) and start serving; a
        rank that cannot (out of memory) is reported with its message."""
        self._send(tp_wire.start_message(layout))
        try:
            wait_ready(self.groups, self.children, "cache")
        except RuntimeError as exc:
            raise self._fail(str(exc)) from exc

    def run(
        self, batch: ModelBatch, forward: Callable[[ModelBatch], ForwardOutput]
    ) -> ForwardOutput:
        self._send(tp_wire.step_message(batch))  # checks the ranks first
        try:
            return forward(batch)
        except Exception as exc:
            raise self._fail(self._exited() or f"the forward pass failed: {exc}") from exc

    def check(self) -> None:
        """EngineDeadError if the group failed or one of this machine's ranks has exited."""
        if self.failure is None:
            exited = self._exited(wait_s=0.0)
            if exited:
                self._fail(exited)
        if self.failure is not None:
            raise EngineDeadError(self.failure)

    def _exited(self, wait_s: float = EXIT_WAIT_S) -> str | None:
        """Which of this machine's ranks has exited (waiting up to wait_s for one: a failed
        collective usually means a peer just died), or None."""
        deadline = time.monotonic() + wait_s
        while (exited := _first_exit(self.children)) is None and time.monotonic() < deadline:
            time.sleep(STATUS_POLL_S)
        return exited

    def stop(self) -> None:
        """Tell every rank to exit, then make sure this machine's do (killed past a grace)."""
        if self._stopped:
            return
        self._stopped = True
        if self.failure is not None:  # the ranks are out of step (or hung): no stop message
            stop_children_now(self.children)
        else:
            try:
                self.groups.control.send(tp_wire.stop_message())
            except Exception:
                log.warning("could not send the stop message to the other ranks")
            stop_children(self.children)
        torch.set_num_threads(self._threads)

    def _send(self, data: bytes) -> None:
        self.check()
        try:
            self.groups.control.send(data)
        except Exception as exc:
            why = f"sending to the other ranks failed: {exc}"
            raise self._fail(self._exited() or why) from exc

    def _fail(self, why: str) -> EngineDeadError:
        if self.failure is None:
            self.failure = f"tensor parallelism failed: {why}"
            log.error("%s", self.failure)
        return EngineDeadError(self.failure)


def _first_exit(children: dict[int, subprocess.Popen]) -> str | None:
    for rank, proc in children.items():
        if proc.poll() is not None:
            return f"tensor-parallel rank {rank} exited with status {proc.returncode}"
    return None


def stop_children(children: dict[int, subprocess.Popen]) -> None:
    deadline = time.monotonic() + STOP_JOIN_S
    for proc in children.values():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_init_method() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def local_inits(config: EngineConfig, first: DistributedInit | None) -> list[DistributedInit]:
    """This machine's ranks: node_rank * local ... (node_rank + 1) * local - 1, or the one
    torchrun gave this process."""
    if first is not None:
        return [first]
    size, nodes = config.tensor_parallel_size, config.nnodes
    local = size // nodes
    method = config.distributed_init_method or _free_init_method()
    return [
        DistributedInit(method, size, config.node_rank * local + i, i, local) for i in range(local)
    ]


def spawn(
    config: EngineConfig, inits: list[DistributedInit], threads: int
) -> dict[int, subprocess.Popen]:
    """Start these ranks as child processes (`main`, given the config and its rank)."""
    children = {}
    # The other ranks take the KV layout (rings sized for drafts too) from rank 0's start
    # message: they never speculate themselves.
    config = dataclasses.replace(config, speculative_config=None)
    for init in inits:
        args = [json.dumps(dataclasses.asdict(x)) for x in (config, init)]
        cmd = [sys.executable, "-c", CHILD_MAIN, *args]
        env = {**os.environ, PARENT_ENV: str(os.getpid()), THREADS_ENV: str(threads)}
        children[init.rank] = subprocess.Popen(cmd, env=env)
    return children


def threads_per_rank(local_world_size: int) -> int:
    """On CPU each of a machine's ranks gets its share of the threads."""
    return max(1, torch.get_num_threads() // local_world_size)


def _device(config: EngineConfig, init: DistributedInit) -> torch.device:
    device = model_source.resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(init.local_rank)
        return torch.device("cuda", init.local_rank)
    return device


def join(
    config: EngineConfig,
    init: DistributedInit,
    children: dict[int, subprocess.Popen] | None = None,
) -> tuple[Groups, model_source.LoadedModel]:
    """Meet the group (rank 0 watching its `children`) and load this rank's shard; the
    start-up result goes to the store (a failure also raises here)."""
    device = _device(config, init)
    check = None if children is None else (lambda: _first_exit(children))
    groups = connect(init, device, config.distributed_timeout, check)
    try:
        loaded = model_source.load(config, model_source.Shard(groups.tensor, device))
    except Exception as exc:
        groups.report_status("load", f"{type(exc).__name__}: {exc}")
        raise
    groups.report_status("load", None)
    return groups, loaded


def wait_ready(groups: Groups, children: dict[int, subprocess.Popen], stage: str = "load") -> None:
    """Wait for every rank's result of a start-up stage; RuntimeError naming the first that
    failed (or that exited before it was done)."""
    store = groups.store
    waiting = set(range(1, groups.init.world_size))
    deadline = time.monotonic() + START_TIMEOUT_S  # for ranks on other machines
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel ranks {sorted(waiting)} were not ready in time")
        for rank in sorted(waiting):
            key = STATUS_KEY.format(stage, rank)
            if store.check([key]):  # type: ignore[attr-defined]
                waiting.discard(rank)
                error = store.get(key).decode()  # type: ignore[attr-defined]
                if error:
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} failed to start ({stage}): {error}"
                    )
            elif rank in children and children[rank].poll() is not None:
                code = children[rank].returncode
                raise RuntimeError(f"tensor-parallel rank {rank} exited with status {code}")
        time.sleep(STATUS_POLL_S if waiting else 0)


@dataclass(frozen=True)
class _Machine:
    """This machine's ranks once started: this process's, and the children's processes."""

    me: DistributedInit
    children: dict[int, subprocess.Popen]
    threads_before: int  # this process's thread count before it took its share


def _start_machine(config: EngineConfig) -> _Machine:
    """Convert the checkpoint if needed (once, here), start this machine's other ranks and
    give this process its share of the threads."""
    inits = local_inits(config, DistributedInit.from_torchrun())
    local = inits[0].local_world_size
    cuda = model_source.resolve_device(config.device).type == "cuda"
    if cuda and torch.cuda.device_count() < local:
        raise ValueError(
            f"{local} tensor-parallel ranks on this machine need {local} GPUs, "
            f"{torch.cuda.device_count()} are visible"
        )
    model_source.prepare(config)
    before = torch.get_num_threads()
    threads = threads_per_rank(local)
    children = spawn(config, inits[1:], threads)
    torch.set_num_threads(threads)
    return _Machine(inits[0], children, before)


def launch(config: EngineConfig) -> model_source.LoadedModel:
    """Rank 0: start this machine's other ranks, load rank 0's shard, wait until all are
    ready. Every failure stops the ranks this call started."""
    machine = _start_machine(config)
    try:
        groups, loaded = join(config, machine.me, machine.children)
        wait_ready(groups, machine.children)
    except BaseException:
        torch.set_num_threads(machine.threads_before)
        stop_children_now(machine.children)
        raise
    workers = WorkerGroup(groups, machine.children, machine.threads_before)
    return dataclasses.replace(loaded, workers=workers)


def serve_node(config: EngineConfig) -> int:
    """A process that is a non-zero rank (torchrun's, or the first rank of a machine other
    than rank 0's, which starts that machine's other ranks): serve steps until stopped."""
    machine = _start_machine(config)
    try:
        return run_worker(config, machine.me)
    except Exception:
        log.exception("tensor-parallel rank %d failed", machine.me.rank)
        return 1
    finally:
        stop_children(machine.children)


def stop_children_now(children: dict[int, subprocess.Popen]) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def serve_steps(config: EngineConfig, groups: Groups, loaded: model_source.LoadedModel) -> None:
    """A non-zero rank's loop: build the KV cache when told, then run each step sent."""
    device = loaded.device
    msg = tp_wire.read(groups.control.recv(), device)
    if msg.kind == "stop":
        return
    if msg.layout is None:
        raise RuntimeError(f"expected the start message, got {msg.kind!r}")
    model = loaded.model
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    try:
        cache = KVCache(model.config, msg.layout, device)
    except Exception as exc:
        groups.report_status("cache", f"{type(exc).__name__}: {exc}")
        raise
    groups.report_status("cache", None)
    runner = Runner(model, cache, None, select_ops(device, config.force_reference_kernels), device)
    while (msg := tp_wire.read(groups.control.recv(), device)).kind != "stop":
        if msg.batch is None:
            raise RuntimeError(f"expected a step, got {msg.kind!r}")
        runner.forward_local(msg.batch)


def run_worker(config: EngineConfig, init: DistributedInit) -> int:
    """One non-zero rank, start to finish; the process's exit status."""
    groups, loaded = join(config, init)
    serve_steps(config, groups, loaded)
    return 0


def _die_with_parent() -> None:
    """Exit when the parent process is gone (no orphaned ranks). A watcher thread, not
    PR_SET_PDEATHSIG: that fires when the spawning *thread* ends (the server's loader)."""
    parent = int(os.environ.get(PARENT_ENV, "0"))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    if parent:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry of a child rank: argv is its EngineConfig and DistributedInit as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches rank 0, which stops us
    config = EngineConfig(**json.loads(argv[0]))
    init = DistributedInit(**json.loads(argv[1]))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {init.rank}: %(message)s"
    )
    threads = int(os.environ.get(THREADS_ENV, "0"))
    if threads:
        torch.set_num_threads(threads)
    try:
        return run_worker(config, init)
    except Exception:
        log.exception("tensor-parallel rank %d failed", init.rank)
        return 1
