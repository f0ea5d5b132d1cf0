"""The tensor-parallel process group: who is which rank, the rendezvous, and the two channels.

- The model channel (`TensorGroup`): the forward pass's all-reduces and gathers. Gloo on CPU,
  NCCL on CUDA, with a bounded timeout (--distributed-timeout): a rank that hangs mid-step
  fails the step on the others instead of blocking them forever.
- The control channel (`ControlChannel`): rank 0 broadcasts each step's batch (a pickled
  `tp_wire.StepMessage`) over Gloo, whatever the device. Its timeout is long, because the
  other ranks wait on it while the server is idle; a rank that dies closes its connections,
  which fails a pending broadcast at once.
The groups are built directly on a TCPStore (no torch.distributed default group): nothing
global is set, and several groups can live in one process (tests).
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist
from gemma_serve.model.parallel import TensorGroup

CONTROL_TIMEOUT = datetime.timedelta(days=30)
STATUS_KEY = "gemma-serve/status/{}"  # each rank's start-up result, in the store


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
    """Rank 0 -> every rank: one pickled object per call (its length, then its bytes)."""

    def __init__(self, pg: object) -> None:
        self.pg = pg

    def _broadcast(self, t: torch.Tensor) -> None:
        self.pg.broadcast(t, 0).wait()  # type: ignore[attr-defined]

    def send(self, obj: object) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self._broadcast(torch.tensor([len(data)], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv(self) -> object:
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(buf)
        return pickle.loads(buf.numpy().tobytes())


@dataclass
class Groups:
    """One rank's handles: the store (start-up statuses), the model and control channels."""

    init: DistributedInit
    store: object
    tensor: TensorGroup
    control: ControlChannel

    def report_status(self, error: str | None) -> None:
        """This rank's start-up result ("" = ready), read by rank 0."""
        self.store.set(STATUS_KEY.format(self.init.rank), error or "")  # type: ignore[attr-defined]


def connect(init: DistributedInit, device: torch.device, timeout_s: float) -> Groups:
    """Meet the other ranks (blocks until all have joined, at most timeout_s)."""
    host, port = init.address
    timeout = datetime.timedelta(seconds=timeout_s)
    is_server = init.rank == 0 and init.host_store
    store = dist.TCPStore(
        host, port, init.world_size, is_server, timeout=timeout, wait_for_workers=False
    )
    rank, size = init.rank, init.world_size
    model_store = dist.PrefixStore("gemma-serve/model", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        model_pg: object = dist.ProcessGroupNCCL(model_store, rank, size, options)
    else:
        model_pg = dist.ProcessGroupGloo(model_store, rank, size, timeout)
    # Built second: once the model group exists every rank is there, so the long timeout
    # of the control group never waits for a rank that did not start.
    control_pg = dist.ProcessGroupGloo(
        dist.PrefixStore("gemma-serve/control", store), rank, size, CONTROL_TIMEOUT
    )
    return Groups(init, store, TensorGroup(rank, size, model_pg), ControlChannel(control_pg))
