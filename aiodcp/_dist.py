"""Parent-side torch.distributed helpers: which group, which rank, the daemons' rendezvous.

The rendezvous is the one collective the parent runs for a daemon start: rank 0
picks where the daemons' store lives and broadcasts it. It is blocking, so the
caller runs it in a worker thread.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Group", "Rendezvous", "rendezvous", "resolve_group"]


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


def rendezvous(group: Group, use_prefix_store: bool) -> Rendezvous:
    """Rank 0 decides where the daemons meet; every rank learns it (blocking collective)."""
    mine: Any = None
    if group.rank == 0:
        token = uuid.uuid4().hex
        if use_prefix_store:
            addr = os.environ.get("MASTER_ADDR")
            port = os.environ.get("MASTER_PORT")
            mine = (
                ValueError("use_prefix_store needs MASTER_ADDR and MASTER_PORT in the environment")
                if addr is None or port is None
                else Rendezvous(addr, int(port), token)
            )
        else:
            addr = os.environ.get("MASTER_ADDR") or socket.getfqdn()
            mine = Rendezvous(addr, _free_port(addr), token)
    result = _from_rank0(group, mine)
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, Rendezvous)
    return result


def _from_rank0(group: Group, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (blocking collective)."""
    box: list[Any] = [obj]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(group.pg, 0), group=group.pg, device=group.device
    )
    return box[0]


def broadcast_int(group: Group, value: int | None) -> int | None:
    """Rank 0's ``value`` on every rank (blocking collective)."""
    out: int | None = _from_rank0(group, value)
    return out
