"""The tensor-parallel process group: who is which rank, the rendezvous, and the two channels.

- The model channel (`TensorGroup`): the forward pass's all-reduces and gathers. Gloo on CPU,
  NCCL on CUDA, with a bounded timeout (--distributed-timeout): a rank that hangs mid-step
  fails the step on the others instead of blocking them forever. Joining the group has its
  own, longer timeout (ranks on other machines start and load at their own pace).
- The control channel (`ControlChannel`): rank 0 broadcasts each step's batch (tp_wire.py's
  bytes) over Gloo, whatever the device. Its timeout is long, because the
  other ranks wait on it while the server is idle; a rank that dies closes its connections,
  which fails a pending broadcast at once.
The groups are built directly on a TCPStore (no torch.distributed default group): nothing
global is set, and several groups can live in one process (tests).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from gemma_serve.model.parallel import TensorGroup

CONTROL_TIMEOUT = datetime.timedelta(days=30)
# Each rank's result of a start-up stage ("load": its shard; "cache": its KV cache), in the store.
STATUS_KEY = "gemma-serve/{}/{}"
JOINED_KEY = "gemma-serve/joined/{}"  # set by each rank once it reaches the store
START_TIMEOUT_S = 600.0  # ranks on other machines may start (and load) minutes apart
JOIN_POLL_S = 0.05


@dataclass(frozen=True)
class DistributedInit:
    """Where the ranks meet and which one this process is."""

    init_method: str  # tcp://HOST:PORT (rank 0's store)
    world_size: int
    rank: int
    local_rank: int  # index among this machine's ranks (the CUDA device)
    local_world_size: int
    host_store: bool = True  # rank 0 serves the store (False under torchrun's agent store)

    @property
    def address(self) -> tuple[str, int]:
        url = urlparse(self.init_method)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise ValueError(
                f"--distributed-init-method must be tcp://HOST:PORT, got {self.init_method!r}"
            )
        return url.hostname, url.port

    @classmethod
    def from_torchrun(cls) -> DistributedInit | None:
        """This process's place when started by torchrun (its environment), else None."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
            return None
        return cls(
            init_method=f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}",
            world_size=int(env["WORLD_SIZE"]),
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            host_store=env.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        )


class ControlChannel:
    """Rank 0 -> every rank: one message (bytes, tp_wire.py) per call: its length, then it.

    Receiving waits as long as the server is idle; sending gives up after `send_timeout`
    (a Gloo broadcast's root waits for the receivers: a hung rank would block it)."""

    def __init__(self, pg: object, send_timeout: datetime.timedelta) -> None:
        self.pg, self.send_timeout = pg, send_timeout

    def send(self, data: bytes) -> None:
        for t in (
            torch.tensor([len(data)], dtype=torch.int64),
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
        ):
            self.pg.broadcast(t, 0, self.send_timeout).wait()  # type: ignore[attr-defined]

    def recv(self) -> bytes:
        size = torch.zeros(1, dtype=torch.int64)
        self.pg.broadcast(size, 0).wait()  # type: ignore[attr-defined]
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self.pg.broadcast(buf, 0).wait()  # type: ignore[attr-defined]
        return buf.numpy().tobytes()


@dataclass
class Groups:
    """One rank's handles: the store (start-up statuses), the model and control channels."""

    init: DistributedInit
    store: object
    tensor: TensorGroup
    control: ControlChannel

    def report_status(self, stage: str, error: str | None) -> None:
        """This rank's result of a start-up stage ("" = done), read by rank 0."""
        key = STATUS_KEY.format(stage, self.init.rank)
        self.store.set(key, error or "")  # type: ignore[attr-defined]


def connect(
    init: DistributedInit,
    device: torch.device,
    timeout_s: float,
    check: Callable[[], str | None] | None = None,
) -> Groups:
    """Meet the other ranks. Rank 0 passes `check` (a local rank that has exited, or None):
    until every rank has joined the store it polls, so that a rank dying at start-up is
    reported at once instead of after the start-up timeout. Collectives then time out after
    timeout_s."""
    host, port = init.address
    is_server = init.rank == 0 and init.host_store
    start = datetime.timedelta(seconds=max(timeout_s, START_TIMEOUT_S))
    store = dist.TCPStore(
        host, port, init.world_size, is_server, timeout=start, wait_for_workers=False
    )
    store.set(JOINED_KEY.format(init.rank), "1")
    if check is not None:
        _wait_joined(store, init.world_size, check)
    rank, size = init.rank, init.world_size
    model_store = dist.PrefixStore("gemma-serve/model", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = datetime.timedelta(seconds=timeout_s)
        model_pg: object = dist.ProcessGroupNCCL(model_store, rank, size, options)
    else:
        model_pg = dist.ProcessGroupGloo(model_store, rank, size, start)
        model_pg._set_default_timeout(datetime.timedelta(seconds=timeout_s))  # type: ignore
    control_pg = dist.ProcessGroupGloo(
        dist.PrefixStore("gemma-serve/control", store), rank, size, CONTROL_TIMEOUT
    )
    control = ControlChannel(control_pg, datetime.timedelta(seconds=timeout_s))
    return Groups(init, store, TensorGroup(rank, size, model_pg), control)


def _wait_joined(store: object, size: int, check: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    keys = [JOINED_KEY.format(r) for r in range(size)]
    while not store.check(keys):  # type: ignore[attr-defined]
        problem = check()
        if problem is not None:
            raise RuntimeError(f"{problem} before it joined the group")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every tensor-parallel rank joined in {START_TIMEOUT_S}s")
        time.sleep(JOIN_POLL_S)
