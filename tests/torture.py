"""Seeded random schedules of calls and faults against real daemons.

One *schedule* is 3-6 random operations on an open checkpointer:

* ``save`` of one of several layouts, overlapped or not;
* ``train``: a BatchNorm model + AdamW saved with ``overlap=True`` under a guard, and
  a synchronous training step right after (forward and ``opt.step()`` must not leak);
* ``bad``: an overlapped copy that fails (an unsendable value), a guarded training
  step right after (it must not hang), its handle sometimes never awaited;
* ``dup``: a save of a committed step (CheckpointExistsError);
* ``native``: a save cancelled at a random moment the way each framework's users do
  (asyncio's ``task.cancel()``, ``wait_for``, ``asyncio.timeout``; anyio/trio scopes);
* ``prepare``, ``cancel``, awaiting, ``wait``, SIGKILL and SIGSTOP/SIGCONT of the
  daemon, a raising ``on_event``;

* ``publish`` (``ckpt.publish``) and ``savepub`` (``save(publish=True)``), through a
  ring of 1-3 places under a random ``when_full``, while a reader task follows the
  publication (its ``__anext__`` sometimes cancelled mid-flight) and holds each
  version a random while;

with other programs' entries and an incomplete ``step_N/`` in the root, and, when
retention is on, a reader loading with ``verify=True`` meanwhile. Then the
invariants: every handle resolves within a bound to an outcome its operation allows
(a save with no fault must commit; a failure is the injected fault's); ``wait()``
raises exactly the failure nobody awaited; every committed step loads bit-exact to
the values at its ``save()`` call; the disk lists nothing uncommitted; readers never
see anything but the step or CheckpointNotFoundError. Publication: every value a
reader sees (views and ``copy_into``) belongs to one version, the one published under
that number; a leased version is in the ring and never changes while leased, and what a
reader holds stays readable after the publisher closed. At every close nothing may be
left: no daemon, arena or version memfd, mapping, descriptor or thread, nothing in
``/dev/shm``; the garbage collector and switch interval as they were; the foreign
entries untouched. Run by ``tests/test_torture.py``
(1 rank on asyncio, on trio, and under torchrun on 2 ranks: the same seed drives
both, faults hit one rank).

    python tests/torture.py ROOT --seed 7 --schedules 2000   # a long run
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import torch

import aiodcp
from aiodcp import CheckpointError

LAYOUTS = [
    [(64,), (32, 32), (3,)],
    [(200,)],
    [(16,)] * 24,
    [(8, 8), (0,), (5,)],
]
BOUND = 60.0  # seconds any handle may take to resolve, faults included
PER_OPEN = 25
THREAD_POOLS = ("AnyIO", "asyncio", "Trio thread")  # the event loops' own worker threads


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "aiodcp-" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _maps() -> int:
    """This process's mappings of aiodcp memfds (arenas, versions, a publisher's spare)."""
    with open("/proc/self/maps") as f:
        return sum("aiodcp-" in line for line in f)


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "aiodcp" in n}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Unsendable:
    """A value that cannot cross to the daemon: its save fails with a TypeError."""

    def __reduce__(self) -> Any:
        raise TypeError("an unsendable value (on purpose)")


def bn_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """A synchronous training step: its forward updates BatchNorm's running statistics."""
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@dataclass
class Record:
    """One save() and what it may end as: ``commit`` (it must commit), ``cancel``
    (committed or cancelled), ``any`` (a daemon was killed meanwhile: committed or a
    CheckpointError), ``type`` (TypeError), ``exists`` (CheckpointExistsError, or a
    commit if retention deleted the step first)."""

    handle: aiodcp.SaveHandle
    values: dict[str, Any]
    expect: str
    model: bool = False  # values are a BatchNorm model's state at the call


FOREIGN = (".tmp-dataset-shards", ".trash-bin-notes", ".latest.json")


class Torture:
    def __init__(
        self, root: Path, seed: int, rank: int = 0, world: int = 1, backend: str = "asyncio"
    ) -> None:
        self.root = root
        self.seed = seed
        self.rng = random.Random(seed)
        self.rank = rank
        self.world = world
        self.backend = backend
        self.committed: dict[int, Record] = {}
        self.pids: set[int] = set()
        self.schedules = 0
        self.keep_last: int | None = None
        self.dropped: list[aiodcp.SaveHandle] = []  # failures left for wait() to raise
        self.killed: set[int] = set()  # daemons this rank killed
        self.stats = {
            "saves": 0, "committed": 0, "failed": 0, "cancelled": 0, "kills": 0, "stops": 0,
            "native_cancels": 0, "bad_copies": 0, "duplicates": 0, "trained": 0, "reads": 0,
            "published": 0, "pub_skipped": 0, "versions_seen": 0,
        }  # fmt: skip
        # publication (one rank only: each rank's ring fills by its own readers' timing)
        self.pub: aiodcp.Publisher | None = None
        self.published: dict[int, dict[str, torch.Tensor]] = {}  # version -> values
        self.seen: list[tuple[int, dict[str, torch.Tensor]]] = []  # what the reader saw
        self.holding: dict[int, int] = {}  # version -> leases the reader holds now

    def where(self) -> str:
        return f"(seed {self.seed}, schedule {self.schedules}, rank {self.rank})"

    def state(self) -> dict[str, torch.Tensor]:
        shapes = self.rng.choice(LAYOUTS)
        base = self.rng.randrange(1 << 20)
        return {
            f"t{i}": torch.arange(base + i, base + i + max(1, torch.Size(s).numel()))[
                : torch.Size(s).numel()
            ]
            .reshape(s)
            .float()
            for i, s in enumerate(shapes)
        }

    async def run(self, schedules: int) -> None:
        while self.schedules < schedules:
            await self.session(min(PER_OPEN, schedules - self.schedules))
        expected = sum(1 for r in self.committed.values() if r.expect == "commit")
        assert self.stats["committed"] > 0 and expected > 0, f"nothing committed {self.where()}"

    def plant_foreign(self) -> list[Path]:
        """Other programs' entries in the root (and an incomplete step_N/, as a crashed
        plain dcp.save leaves): aiodcp must neither delete them nor trip over them."""
        gap = self.rng.randint(1, 3)  # drawn on every rank: the ranks share one stream
        if self.rank != 0:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        planted = []
        for name in FOREIGN:
            path = self.root / name
            if name.endswith(".json"):
                path.write_text("{}")
            else:
                path.mkdir(exist_ok=True)
                (path / "keep").write_text("x")
            planted.append(path)
        taken = [int(p.name[5:]) for p in self.root.glob("step_*") if p.name[5:].isdigit()]
        incomplete = self.root / f"step_{max(taken, default=0) + gap}"
        incomplete.mkdir(exist_ok=True)
        (incomplete / "__0_0.distcp").write_bytes(b"partial")
        planted.append(incomplete)
        return planted

    async def session(self, n: int) -> None:
        fds, memfds, maps, shm = _fds(), _memfds(), _maps(), _shm()
        threads = {t for t in threading.enumerate() if not t.name.startswith(THREAD_POOLS)}
        raising = self.rng.random() < 0.3
        self.keep_last = self.rng.choice([None, None, 2])
        planted = self.plant_foreign()
        model, opt = bn_model(self.seed + self.schedules)
        publishing = self.world == 1 and self.rng.random() < 0.6
        self.pub, self.published, self.holding = None, {}, {}
        kept: tuple[Any, Any, dict[str, torch.Tensor]] | None = None

        def on_event(event: aiodcp.SaveEvent) -> None:
            if raising and event.phase == "staged":
                raise RuntimeError("a callback bug")

        async with aiodcp.AsyncCheckpointer(
            self.root,
            max_inflight=self.rng.choice([1, 2]),
            shutdown_timeout=2,
            collective_timeout=30,
            keep_last=self.keep_last,
            on_event=on_event,
        ) as ckpt:
            ckpt.guard(opt, model)
            if publishing:
                self.pub = await ckpt.publisher(
                    ring=self.rng.randint(1, 3),
                    when_full=self.rng.choice(["skip", "wait", "allocate"]),
                )
            async with anyio.create_task_group() as readers:
                stop = anyio.Event()
                if self.keep_last is not None and self.world == 1:  # (loads are collective)
                    readers.start_soon(self.read_while_retention_runs, stop)
                following = anyio.CancelScope()
                if publishing:
                    readers.start_soon(self.follow_publication, following)
                try:
                    for _ in range(n):
                        await self.schedule(ckpt, model, opt)
                        self.schedules += 1
                finally:
                    stop.set()
                    following.cancel()
            if publishing and self.published:
                kept = await self.hold_latest()
        if kept is not None:  # the publisher is gone: what the reader holds is intact
            versions, version, values = kept
            views = version.state_dict()
            for k, v in values.items():
                assert torch.equal(views[k], v), f"a held version changed at close {self.where()}"
            await version.release()
            await versions.aclose()
        self.check_seen()
        self.pub = None
        for pid in self.pids:
            assert not _alive(pid), f"daemon {pid} outlived its checkpointer {self.where()}"
        assert _memfds() == memfds, f"memfd leaked {self.where()}"
        assert _maps() == maps, f"mapping of a memfd left {self.where()}"
        assert _shm() == shm, f"left in /dev/shm: {_shm() - shm} {self.where()}"
        assert _fds() <= fds + 2, f"fds {fds} -> {_fds()} {self.where()}"
        assert gc.isenabled(), f"the garbage collector was left disabled {self.where()}"
        assert sys.getswitchinterval() == 0.005, f"switch interval left changed {self.where()}"
        left = {
            t
            for t in threading.enumerate()
            if not t.name.startswith(THREAD_POOLS) and t not in threads
        }
        assert not left, f"threads left: {left} {self.where()}"
        for path in planted:
            assert path.exists(), f"aiodcp deleted a foreign entry {path.name} {self.where()}"

    async def read_while_retention_runs(self, stop: anyio.Event) -> None:
        """A reader loading committed steps with verify=True while retention deletes old
        ones: it gets the step bit-exact or CheckpointNotFoundError, never anything else."""
        rng = random.Random(self.seed * 7 + self.rank)  # never the ranks' shared stream
        while not stop.is_set():
            steps = [s for s in sorted(self.committed) if not self.committed[s].model]
            if steps:
                step = steps[-1] if rng.random() < 0.5 else rng.choice(steps)
                expected = self.committed[step].values
                out = {k: torch.full_like(v, -1.0) for k, v in expected.items()}
                try:
                    await aiodcp.load(out, self.root, step=step, verify=True)
                except aiodcp.CheckpointNotFoundError:
                    pass
                else:
                    self.stats["reads"] += 1
                    for k, v in expected.items():
                        assert torch.equal(out[k], v), f"reader: step {step} {k} {self.where()}"
            await anyio.sleep(0.02)

    async def follow_publication(self, scope: anyio.CancelScope) -> None:
        """A reader following the checkpointer's publisher until ``scope`` is cancelled:
        each version's views and copy are recorded (checked against what was published),
        it is in the ring while leased, and unchanged when its lease ends."""
        rng = random.Random(self.seed * 13 + self.schedules)  # never the shared stream
        with scope:
            async with aiodcp.follow(
                self.root, rank=self.rank, source="memory", poll_interval=0.01
            ) as versions:
                while True:
                    version = None
                    with anyio.move_on_after(rng.choice([0.001, 0.3, 30.0])):  # cancel mid-way
                        version = await versions.__anext__()
                    if version is None:
                        continue
                    async with version:
                        views = version.state_dict()
                        first = {k: v.clone() for k, v in views.items()}
                        mine = {k: torch.full_like(v, -1.0) for k, v in first.items()}
                        await version.copy_into(mine)
                        for k, v in first.items():
                            assert torch.equal(mine[k], v), f"copy != views {self.where()}"
                        self.seen.append((version.number, first))
                        n = version.number
                        self.holding[n] = self.holding.get(n, 0) + 1
                        try:
                            self.check_leases()
                            await anyio.sleep(rng.choice([0, 0.005, 0.03, 0.2]))
                            self.check_leases()
                        finally:
                            self.holding[n] -= 1
                        for k, v in first.items():
                            assert torch.equal(views[k], v), (
                                f"leased version {version.number} changed {self.where()}"
                            )
                    self.stats["versions_seen"] += 1

    def check_leases(self) -> None:
        """A leased version is in the ring, counted at least as often as it is held."""
        assert self.pub is not None
        live = self.pub.live
        for number, count in self.holding.items():
            assert not count or live.get(number, -1) >= count, (
                f"version {number} leased {count}x but the ring has {live} {self.where()}"
            )

    async def hold_latest(self) -> tuple[Any, Any, dict[str, torch.Tensor]] | None:
        """Lease the newest version now (held across the publisher's close)."""
        versions = aiodcp.follow(self.root, rank=self.rank, source="memory")
        with anyio.move_on_after(BOUND):
            version = await versions.__anext__()
            values = {k: v.clone() for k, v in version.state_dict().items()}
            self.seen.append((version.number, values))
            return versions, version, values
        await versions.aclose()
        raise AssertionError(f"no version to hold after publishing {self.where()}")

    def check_seen(self) -> None:
        """Every value the reader saw belongs to one version: the one published under
        that number, whole (never a mix of two, never a half-written one)."""
        for number, values in self.seen:
            assert number in self.published, f"version {number} never published {self.where()}"
            expected = self.published[number]
            assert values.keys() == expected.keys(), f"version {number} keys {self.where()}"
            for k, v in expected.items():
                assert torch.equal(values[k], v), f"version {number} {k} torn {self.where()}"
        self.seen.clear()

    async def publish(self, ckpt: aiodcp.AsyncCheckpointer, records: list[Record]) -> None:
        """``ckpt.publish`` (numbered past the highest so far), or ``save(publish=True)``
        (version = the step; refused at once with ValueError if not newer)."""
        values = self.state()
        snap = {k: v.clone() for k, v in values.items()}
        assert self.pub is not None
        if self.rng.random() < 0.6:
            number = max(self.published, default=-1) + self.rng.randint(1, 2)
            self.published[number] = snap  # before: the reader may see it at once
            with anyio.fail_after(BOUND):
                got = await ckpt.publish(values, version=number)
            assert got in (number, None), f"published {got} for {number} {self.where()}"
            self.check_leases()  # a publish never takes a leased version's place
            self.stats["published" if got is not None else "pub_skipped"] += 1
            return
        try:
            with anyio.fail_after(BOUND):
                handle = await ckpt.save(values, publish=True)
        except ValueError:
            return  # its step is not newer than a version published: refused at once
        self.published[handle.step] = snap
        self.check_leases()
        records.append(Record(handle, snap, "commit"))
        self.stats["saves"] += 1

    def fault_here(self) -> bool:
        """Faults hit one rank, chosen by the shared random stream."""
        return self.rng.randrange(self.world) == self.rank

    async def schedule(
        self, ckpt: aiodcp.AsyncCheckpointer, model: torch.nn.Module, opt: torch.optim.Optimizer
    ) -> None:
        records: list[Record] = []
        killed = False
        # One rank alone cancelling before staging, or picking a step from a listing that
        # a peer's commit can change, would put the ranks out of step: one rank only.
        native = self.world == 1
        async with anyio.create_task_group() as tg:
            for _ in range(self.rng.randint(3, 6)):
                pub = 4 if self.pub is not None else 0
                op = self.rng.choices(
                    ["save", "train", "bad", "dup", "native", "prepare", "cancel", "await",
                     "wait", "kill", "stop", "sleep", "publish"],
                    weights=[10, 3, 1, native, 2 * native, 2, 2, 3, 1, 0.35, 0.5, 2, pub],
                )[0]  # fmt: skip
                if op == "publish":
                    await self.publish(ckpt, records)
                elif op == "save":
                    values = self.state()
                    overlap = self.rng.random() < 0.4
                    handle = await ckpt.save(values, overlap=overlap)
                    snap = {k: v.clone() for k, v in values.items()}
                    records.append(Record(handle, snap, "commit"))
                    self.stats["saves"] += 1
                elif op == "train":
                    # overlap=True under a guard, then a synchronous step at once: the forward
                    # (BatchNorm statistics) and opt.step() must not leak into the save.
                    handle = await ckpt.save({"model": model, "optim": opt}, overlap=True)
                    snap = {k: v.clone() for k, v in model.state_dict().items()}
                    train_step(model, opt)
                    records.append(Record(handle, snap, "commit", model=True))
                    self.stats["trained"] += 1
                elif op == "bad":
                    # a copy that fails before it is staged, a guarded step right after
                    handle = await ckpt.save({"model": model, "x": Unsendable()}, overlap=True)
                    train_step(model, opt)  # must not hang
                    self.stats["bad_copies"] += 1
                    if self.rng.random() < 0.5:
                        self.dropped.append(handle)  # nobody awaits it: wait() must raise
                    else:
                        records.append(Record(handle, {}, "type"))
                elif op == "dup":
                    await self.duplicate(ckpt, records)
                elif op == "native":
                    await self.cancel_natively(ckpt, records)
                elif op == "prepare":
                    await ckpt.prepare(self.state())
                elif op == "cancel" and records:
                    record = self.rng.choice(records)
                    if self.fault_here() or self.world == 1:
                        record.handle.cancel()
                    if record.expect == "commit":
                        record.expect = "cancel"  # on every rank: the step is cancelled on all
                elif op == "await" and records:
                    with anyio.fail_after(BOUND):
                        try:
                            await self.rng.choice(records).handle
                        except (CheckpointError, TypeError):
                            pass
                elif op == "wait":
                    with anyio.fail_after(BOUND):
                        try:
                            await ckpt.wait()
                        except (CheckpointError, TypeError):
                            self.dropped.clear()  # wait() marks every failure seen
                elif op == "kill":
                    pid = ckpt.worker_pid
                    if self.fault_here() and pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.add(pid)
                        self.stats["kills"] += 1
                    killed = True
                    for record in records:  # every rank: a peer's death fails the step
                        if (
                            record.expect in ("commit", "cancel", "exists")
                            and not record.handle.done()
                        ):
                            record.expect = "any"
                elif op == "stop":
                    pid = ckpt.worker_pid
                    here, seconds = self.fault_here(), self.rng.uniform(0.02, 0.3)
                    if here and pid is not None:
                        tg.start_soon(self.stop_for_a_while, pid, seconds)
                else:
                    await anyio.sleep(self.rng.uniform(0, 0.05))
                if ckpt.worker_pid is not None:
                    self.pids.add(ckpt.worker_pid)
        if killed and self.world > 1:  # a save racing the kill, on either rank
            for record in records:
                record.expect = "any" if record.expect != "type" else "type"
        await self.settle(ckpt, records)

    async def duplicate(self, ckpt: aiodcp.AsyncCheckpointer, records: list[Record]) -> None:
        """save() of a step that is committed: CheckpointExistsError, at once or (overlapped)
        from the handle -- a commit only if retention deleted the step in between."""
        listed = await ckpt.steps()
        if not listed:
            return
        step, overlap = listed[-1], self.rng.random() < 0.5
        values = self.state()
        self.stats["duplicates"] += 1
        try:
            handle = await ckpt.save(values, step=step, overlap=overlap)
        except aiodcp.CheckpointExistsError:
            return
        records.append(Record(handle, {k: v.clone() for k, v in values.items()}, "exists"))

    async def cancel_natively(self, ckpt: aiodcp.AsyncCheckpointer, records: list[Record]) -> None:
        """Cancel a save() the way each framework's own users do, at a random moment: it
        either returns a handle (it was staged in time) or raises the cancellation."""
        values = self.state()
        got: list[aiodcp.SaveHandle] = []
        delay, overlap = self.rng.uniform(0, 0.03), self.rng.random() < 0.3

        async def save() -> None:
            got.append(await ckpt.save(values, overlap=overlap))

        how = self.rng.choice(["task.cancel", "wait_for", "timeout", "scope"])
        if self.backend != "asyncio":
            how = "scope"  # trio's own cancellation is anyio's
        self.stats["native_cancels"] += 1
        if how == "scope":
            with anyio.move_on_after(delay):
                await save()
        else:
            import asyncio

            try:
                if how == "task.cancel":
                    task = asyncio.ensure_future(save())
                    await asyncio.sleep(delay)
                    task.cancel()
                    await task
                elif how == "wait_for":
                    await asyncio.wait_for(save(), delay)
                else:
                    async with asyncio.timeout(delay):
                        await save()
            except (asyncio.CancelledError, TimeoutError):
                pass
        if got:
            records.append(Record(got[0], {k: v.clone() for k, v in values.items()}, "commit"))

    async def stop_for_a_while(self, pid: int, seconds: float) -> None:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        self.stats["stops"] += 1
        try:
            await anyio.sleep(seconds)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    async def settle(self, ckpt: aiodcp.AsyncCheckpointer, records: list[Record]) -> None:
        """Every handle resolves within the bound, to an outcome its record allows; wait()
        raises exactly the failure nobody awaited (or nothing); every commit loads
        bit-exact; nothing uncommitted is listed."""
        fresh: list[int] = []
        for record in records:
            handle, t0 = record.handle, time.monotonic()
            error: BaseException | None = None
            try:
                with anyio.fail_after(BOUND):
                    result = await handle
            except TimeoutError:
                raise AssertionError(
                    f"handle of step {handle.step} unresolved after {BOUND}s {self.where()}"
                ) from None
            except (CheckpointError, TypeError) as exc:
                error = exc
            assert time.monotonic() - t0 < BOUND
            allowed = {
                "commit": (),
                "cancel": (aiodcp.CheckpointCancelledError,),
                "any": (CheckpointError,),
                "type": (TypeError,),
                "exists": (aiodcp.CheckpointExistsError,),
            }[record.expect]
            if error is not None:
                # A save made right after a kill, before the loop saw the death, fails
                # with the killed daemon's WorkerDiedError: the kill's, by its pid.
                if isinstance(error, aiodcp.WorkerDiedError) and any(
                    f"(pid {pid})" in str(error) for pid in self.killed
                ):
                    allowed = (aiodcp.WorkerDiedError,)
                assert isinstance(error, allowed), (
                    f"save of step {handle.step} (expected {record.expect}) failed with "
                    f"{type(error).__name__}: {str(error)[:300]} {self.where()}"
                )
                self.stats["failed"] += 1
                self.stats["cancelled"] += isinstance(error, aiodcp.CheckpointCancelledError)
                continue
            assert record.expect != "type", f"an unsendable save committed {self.where()}"
            assert not result.skipped
            self.committed[result.step] = record
            fresh.append(result.step)
            self.stats["committed"] += 1
        expected_error = bool(self.dropped)
        self.dropped.clear()
        try:
            with anyio.fail_after(BOUND):
                await ckpt.wait()
        except TypeError:
            assert expected_error, f"wait() raised a failure that was awaited {self.where()}"
        else:
            assert not expected_error, f"wait() lost a failure nobody awaited {self.where()}"
        if self.world > 1:  # a step's outcome is the same on every rank
            outcomes = await anyio.to_thread.run_sync(_gather, fresh)
            assert all(o == outcomes[0] for o in outcomes), (
                f"ranks disagree on committed steps: {outcomes} {self.where()}"
            )
        listed = set(await ckpt.steps())
        assert listed <= set(self.committed), (
            f"listed but never committed: {sorted(listed - set(self.committed))} {self.where()}"
        )
        if self.keep_last is not None:
            newest = set(sorted(self.committed)[-self.keep_last :])
            assert newest <= listed, f"retention deleted {sorted(newest - listed)} {self.where()}"
        for step in fresh:
            if step not in listed:
                assert self.keep_last is not None, f"committed {step} not listed {self.where()}"
                continue
            await self.check_loads(ckpt, step)

    async def check_loads(self, ckpt: aiodcp.AsyncCheckpointer, step: int) -> None:
        record = self.committed[step]
        if record.model:
            model, opt = bn_model(-1)
            await ckpt.load({"model": model, "optim": opt}, step=step)
            got = model.state_dict()
        else:
            got = {k: torch.full_like(v, -1.0) for k, v in record.values.items()}
            await ckpt.load(got, step=step)
        for k, v in record.values.items():
            assert torch.equal(got[k], v), f"step {step} {k} differs from its save {self.where()}"


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("AIODCP_TORTURE_SEED", 1)))
    parser.add_argument("--schedules", type=int, default=200)
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--verbose", action="store_true", help="show aiodcp's log lines")
    args = parser.parse_args()
    if not args.verbose:  # the faults are on purpose: their warnings are noise here
        logging.getLogger("aiodcp").setLevel(logging.CRITICAL)
    rank, world = 0, 1
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("AIODCP_TORTURE_DUMP", 1e9)))
    torture = Torture(Path(args.root), args.seed, rank, world, args.backend)
    print(f"torture seed {args.seed} rank {rank}/{world}", flush=True)
    t0 = time.monotonic()
    try:
        anyio.run(torture.run, args.schedules, backend=args.backend)
    finally:
        for pid in torture.pids:  # never leave a stopped daemon behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    print(
        f"OK {torture.schedules} schedules in {time.monotonic() - t0:.0f}s, seed {args.seed}, "
        f"rank {rank}: {torture.stats}",
        flush=True,
    )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
