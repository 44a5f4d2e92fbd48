"""Parent-side torch.distributed helpers: which group, which rank, the daemons' rendezvous.

Whether the daemons (re)start is agreed by every rank at each save, through the
trainer's store (:class:`DaemonAgreement`); when they do, rank 0 picks where the
new daemons meet. Blocking, so the caller runs it in a worker thread.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._errors import CheckpointError

__all__ = [
    "DaemonAgreement",
    "Group",
    "Rendezvous",
    "from_rank0",
    "resolve_group",
]


@dataclass(frozen=True)
class Group:
    """The trainer's process group as aiodcp sees it (``pg=None``: single process)."""

    pg: Any
    rank: int
    world_size: int
    device: Any = None  # for object collectives on NCCL groups

    @property
    def distributed(self) -> bool:
        return self.pg is not None and self.world_size > 1


def resolve_group(process_group: Any) -> Group:
    """``process_group``, else the default group if initialised, else single-process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return Group(None, 0, 1)
        process_group = dist.group.WORLD
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    device = None
    if "nccl" in str(dist.get_backend(process_group)).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return Group(process_group, rank, world, device)


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    token: str


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("" if addr in ("", "0.0.0.0") else addr, 0))
        return int(s.getsockname()[1])


def _pick_rendezvous(use_prefix_store: bool) -> Rendezvous:
    """Rank 0's choice of where the daemons meet."""
    token = uuid.uuid4().hex
    if use_prefix_store:
        addr = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if addr is None or port is None:
            raise CheckpointError(
                "use_prefix_store needs MASTER_ADDR and MASTER_PORT in the environment"
            )
        return Rendezvous(addr, int(port), token)
    addr = os.environ.get("MASTER_ADDR") or socket.getfqdn()
    return Rendezvous(addr, _free_port(addr), token)


_instances = itertools.count()


class DaemonAgreement:
    """Every rank decides together, once per save, whether the daemons (re)start.

    It talks through the trainer's ``torch.distributed`` *store*, never through
    a collective on the trainer's process group: so it can time out and be
    abandoned (cancelled) without leaving the trainer's own collectives out of
    step. Round ``r`` is the ``r``-th call on every rank (each ``save()`` makes
    exactly one call, whatever happens after). Blocking: run it in a thread.
    """

    def __init__(self, group: Group) -> None:
        from torch.distributed import distributed_c10d

        ranks = dist.get_process_group_ranks(group.pg)
        name = f"aiodcp/agree/{next(_instances)}/{','.join(map(str, ranks))}/"
        self.store = dist.PrefixStore(  # type: ignore[attr-defined]
            name, distributed_c10d._get_default_store()
        )
        self.group = group
        self.round = 0

    def agree(
        self, alive: bool, use_prefix_store: bool, timeout: float, abandoned: threading.Event
    ) -> Rendezvous | None:
        """All ranks' daemons alive: None. Else where the new daemons meet (all ranks)."""
        r = self.round
        self.round += 1
        store, world = self.store, self.group.world_size
        if not alive:
            store.add(f"{r}/dead", 1)
        if store.add(f"{r}/arrived", 1) == world:
            store.set(f"{r}/all", "1")
        self._wait(f"{r}/all", timeout, abandoned, f"all {world} ranks to reach the save")
        if self.group.rank == 0 and r >= 2:  # every rank is past round r-2 by now
            for key in ("dead", "arrived", "all", "rdv"):
                store.delete_key(f"{r - 2}/{key}")
        if store.add(f"{r}/dead", 0) == 0:
            return None
        if self.group.rank == 0:
            try:
                chosen: Any = _pick_rendezvous(use_prefix_store)
                payload = json.dumps(
                    {"addr": chosen.master_addr, "port": chosen.master_port, "token": chosen.token}
                )
            except CheckpointError as exc:
                payload = json.dumps({"error": str(exc)})
            store.set(f"{r}/rdv", payload)
        self._wait(f"{r}/rdv", timeout, abandoned, "rank 0 to choose the daemons' rendezvous")
        got = json.loads(store.get(f"{r}/rdv"))
        if "error" in got:
            raise CheckpointError(got["error"])
        return Rendezvous(got["addr"], int(got["port"]), got["token"])

    def _wait(self, key: str, timeout: float, abandoned: threading.Event, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if abandoned.is_set():
                raise CheckpointError(f"abandoned while waiting for {what}")
            try:
                self.store.wait([key], timedelta(seconds=0.2))
                return
            except Exception as exc:  # the store's timeout (DistStoreError / RuntimeError)
                if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                    raise CheckpointError(f"store error while waiting for {what}: {exc}") from exc
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"timed out after {timeout:.0f}s waiting for {what} "
                    f"(rank {self.group.rank}); a rank may have skipped or cancelled this save"
                )


def from_rank0(group: Group, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (blocking collective)."""
    box: list[Any] = [obj]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(group.pg, 0), group=group.pg, device=group.device
    )
    return box[0]
