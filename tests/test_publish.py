"""Live publication: sealed versions, leases, the ring, liveness, leaks, the fallback."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
import torch

import aiodcp
from aiodcp._errors import ProtocolError
from aiodcp._staging._versions import Mapped, _HeaderUnpickler
from aiodcp._wire import _pubwire as w

from .conftest import REPO
from .publish_worker import state

WORKER = str(Path(__file__).with_name("publish_worker.py"))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.timeout(240)  # a loaded 2-core CI box imports torch in ~10 s


def memfds(pid: int | str = "self", name: str = "aiodcp-version") -> list[str]:
    """A process's descriptors that are aiodcp versions (``name="memfd:aiodcp-"``: any memfd)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if name in target:
            out.append(target)
    return out


def mapped(pid: int | str = "self", name: str = "aiodcp-version") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if name in line]


def private() -> list[str]:
    """This process's copy-on-write mappings of versions (a reader's)."""
    return [line for line in mapped() if " rw-p " in line]


class Proc:
    """A worker process whose output lines are read as they come."""

    def __init__(self, process: anyio.abc.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._buf = b""

    async def line(self, prefix: str = "", within: float = 150) -> str:
        """The next line starting with ``prefix`` (earlier lines are kept in ``lines``)."""
        assert self.process.stdout is not None
        with anyio.fail_after(within):
            while True:
                while b"\n" in self._buf:
                    raw, self._buf = self._buf.split(b"\n", 1)
                    text = raw.decode()
                    self.lines.append(text)
                    if text.startswith(prefix):
                        return text
                chunk = await self.process.stdout.receive()
                self._buf += chunk

    async def finish(self, within: float = 150) -> list[str]:
        assert self.process.stdout is not None
        with anyio.fail_after(within):
            async for chunk in self.process.stdout:
                self._buf += chunk
            await self.process.wait()
        self.lines += [x for x in self._buf.decode().splitlines() if x]
        self._buf = b""
        return self.lines


@asynccontextmanager
async def worker(*args: str, loop: str = "asyncio") -> AsyncIterator[Proc]:
    env = {**ENV, "AIODCP_TEST_LOOP": loop}
    process = await anyio.open_process([sys.executable, WORKER, *args], env=env, stderr=None)
    try:
        yield Proc(process)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def fill(value: float) -> dict[str, object]:
    return {"a": torch.full((1000,), value), "b": torch.full((4, 4), value), "step": int(value)}


async def until(predicate, within: float = 60) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110  (polls state of another object)
            await anyio.sleep(0.02)


# ------------------------------------------------------------------ processes
@pytest.mark.asyncio
async def test_four_readers_never_see_a_torn_version(tmp_path: Path) -> None:
    """Published back to back, every version each of 4 reader processes sees has one value
    everywhere, its own number, in views and in the copy; each sees the last one."""
    root = str(tmp_path / "root")
    readers = []
    async with (
        worker("reader", root, "0", "29") as r0,
        worker("reader", root, "0", "29") as r1,
        worker("reader", root, "0", "29") as r2,
        worker("reader", root, "0", "29") as r3,
    ):
        readers = [r0, r1, r2, r3]
        async with worker("learner", root, "30", "0", "3600"):
            for r in readers:
                try:
                    lines = await r.finish()
                except TimeoutError:
                    raise AssertionError(f"{r.lines} {r._buf[-500:]!r}") from None
                assert r.process.returncode == 0, lines
                seen = [int(x.split()[1]) for x in lines if x.startswith("ok")]
                assert seen and seen == sorted(seen) and seen[-1] == 29, lines
                assert not [x for x in lines if x.startswith("torn")], lines


@pytest.mark.asyncio
async def test_readers_on_trio_and_uvloop_follow_a_learner_on_asyncio(tmp_path: Path) -> None:
    """Readers whose programs run trio or uvloop follow the same publisher as an asyncio
    one (their own loops wait on the socket): each sees whole versions, up to the last."""
    root = str(tmp_path / "root")
    async with (
        worker("reader", root, "0", "9", loop="trio") as r0,
        worker("reader", root, "0", "9", loop="uvloop") as r1,
    ):
        async with aiodcp.Publisher(root) as pub:
            await until(lambda: pub.readers == 2, within=150)
            for v in range(10):
                await pub.publish(state(float(v)), version=v)
                await anyio.sleep(0.05)
            for r in (r0, r1):
                lines = await r.finish()
                assert r.process.returncode == 0, lines
                seen = [int(x.split()[1]) for x in lines if x.startswith("ok")]
                assert seen and seen == sorted(seen) and seen[-1] == 9, lines


@pytest.mark.asyncio
async def test_a_killed_reader_releases_its_lease_and_the_ring_recovers(tmp_path: Path) -> None:
    """A reader SIGKILLed while it holds a version: the publisher sees EOF, drops its
    lease, and a ring of one takes new versions again (none skipped)."""
    root = str(tmp_path / "root")
    async with aiodcp.Publisher(root, ring=1, when_full="skip") as pub:
        assert await pub.publish(state(0.0), version=0) == 0
        async with worker("reader", root, "0", "100", "hold") as r:
            await r.line("holding 0")
            assert pub.live == {0: 1} and pub.readers == 1
            assert await pub.publish(state(1.0), version=1) is None  # full: version 0 leased
            os.kill(r.process.pid, signal.SIGKILL)
            await until(lambda: pub.readers == 0)
            assert pub.live == {0: 0}
            assert await pub.publish(state(2.0), version=2) == 2
            assert pub.live == {2: 0}
        assert len(memfds()) in (1, 2)  # version 2, the latest, (and a spare for the next)


@pytest.mark.asyncio
async def test_a_killed_learner_gives_readers_a_typed_error(tmp_path: Path) -> None:
    """A learner SIGKILLed: the reader's next version is PublisherGoneError, and what it
    holds and copied stays readable; nothing of the version is left once it lets go."""
    root = str(tmp_path / "root")
    mine = {
        "model": {
            f"t{i}": torch.zeros(s, dtype=torch.float64)
            for i, s in enumerate([(64, 1024), (1024,), (3, 5, 7), (256, 1024), (1,)])
        }
    }
    async with worker("learner", root, "3", "0", "3600") as learner:
        versions = aiodcp.follow(root, source="memory", poll_interval=0.05)
        await learner.line("published 2")
        version = await versions.__anext__()
        async with version:
            assert version.number == 2 and version.source == "memory"
            await version.copy_into(mine)
            os.kill(learner.process.pid, signal.SIGKILL)
            await learner.process.wait()
            assert bool((version.state_dict()["model"]["t0"] == 2).all())  # still ours
        with pytest.raises(aiodcp.PublisherGoneError):
            await versions.__anext__()
        await versions.aclose()
    assert bool((mine["model"]["t3"] == 2).all())
    assert not memfds(name="memfd:aiodcp-") and not mapped(name="memfd:aiodcp-")  # spares too


@pytest.mark.asyncio
async def test_a_slow_reader_skips_to_the_newest(tmp_path: Path) -> None:
    """A reader slower than the learner gets the newest version each time, never a
    backlog, and ends on the last one."""
    root = str(tmp_path / "root")
    async with worker("reader", root, "0.3", "39") as r:
        async with aiodcp.Publisher(root) as pub:
            await until(lambda: pub.readers == 1)
            for v in range(40):
                await pub.publish(state(float(v)), version=v)
                await anyio.sleep(0.02)
            lines = await r.finish()
    seen = [int(x.split()[1]) for x in lines if x.startswith("ok")]
    assert seen[-1] == 39 and seen == sorted(seen), lines
    assert len(seen) < 10, lines  # 40 versions in ~1 s, 0.3 s each: most skipped


# ------------------------------------------------------------------- the ring
@pytest.mark.asyncio
@pytest.mark.parametrize("when_full", ["skip", "wait", "allocate"])
async def test_a_full_ring_follows_its_policy(tmp_path: Path, when_full: str) -> None:
    """Ring of 2, both versions leased: skip returns None, allocate goes to 3 places,
    wait publishes once a lease ends."""
    root = str(tmp_path / "root")
    async with aiodcp.Publisher(root, ring=2, when_full=when_full) as pub:  # type: ignore[arg-type]
        f1, f2 = aiodcp.follow(root, source="memory"), aiodcp.follow(root, source="memory")
        await pub.publish(fill(0.0), version=0)
        v0 = await f1.__anext__()
        await pub.publish(fill(1.0), version=1)
        v1 = await f2.__anext__()
        assert pub.live == {0: 1, 1: 1}
        if when_full == "skip":
            assert await pub.publish(fill(2.0), version=2) is None
            assert pub.live == {0: 1, 1: 1} and pub.latest == 1
        elif when_full == "allocate":
            assert await pub.publish(fill(2.0), version=2) == 2
            assert pub.live == {0: 1, 1: 1, 2: 0}
        else:
            async with anyio.create_task_group() as tg:
                done: list[int | None] = []

                async def publish() -> None:
                    done.append(await pub.publish(fill(2.0), version=2))

                tg.start_soon(publish)
                await anyio.sleep(0.2)
                assert not done and pub.latest == 1  # waiting for a place
                await v0.release()
            assert done == [2]
            assert pub.live == {1: 1, 2: 0}
        await v1.release()
        await v0.release()
        await f1.aclose()
        await f2.aclose()
    assert not memfds(name="memfd:aiodcp-") and not mapped(name="memfd:aiodcp-")  # spares too


# ------------------------------------------------------------------ leaks, views
@pytest.mark.asyncio
async def test_a_released_version_leaves_no_descriptor_or_mapping(tmp_path: Path) -> None:
    """While held a reader process maps the version; once released (its views kept), the
    mapping is gone and the views read zeros; once the publisher closes, nothing is left."""
    root = str(tmp_path / "root")
    async with aiodcp.Publisher(root) as pub:
        await pub.publish(state(7.0), version=7)
        async with worker("reader", root, "0", "100", "hold") as r:
            await r.line("holding 7")
            assert mapped(r.process.pid) and not memfds(r.process.pid)  # fd closed at once
        async with aiodcp.follow(root, source="memory") as versions:
            version = await versions.__anext__()
            views = version.state_dict()
            assert bool((views["model"]["t0"] == 7).all()) and views["meta"]["version"] == 7
            assert len(private()) == 1  # ours (the publisher's spare is a shared mapping)
            await version.release()
            assert not private()
            assert bool((views["model"]["t0"] == 0).all())  # stale: zeros, never a fault
            with pytest.raises(aiodcp.CheckpointError, match="released"):
                version.state_dict()
        assert len(memfds()) in (1, 2)  # the publisher's (and its spare)
    assert not memfds(name="memfd:aiodcp-") and not mapped(name="memfd:aiodcp-")  # spares too


@pytest.mark.asyncio
async def test_copy_into_is_in_place_and_checks_the_fit(tmp_path: Path) -> None:
    """copy_into writes into the caller's tensors (and modules, optimizers); a state dict
    that does not fit raises CheckpointMismatchError and changes nothing."""
    root = str(tmp_path / "root")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    async with aiodcp.Publisher(root) as pub:
        await pub.publish({"model": model, "optim": opt, "n": 3})
        other = torch.nn.Linear(4, 3)
        weight = other.weight
        async with aiodcp.follow(root, source="memory") as versions:
            async with await versions.__anext__() as version:
                assert version.number == 0
                target = {"model": other, "n": 0}
                await version.copy_into(target)
                assert other.weight is weight and torch.equal(other.weight, model.weight)
                assert target["n"] == 3
                before = other.bias.clone()
                with pytest.raises(aiodcp.CheckpointMismatchError) as err:
                    await version.copy_into({"model": torch.nn.Linear(5, 3), "x": 1})
                assert err.value.missing == ("x",)
                assert torch.equal(other.bias, before)


# ------------------------------------------------------------- with checkpoints
@pytest.mark.asyncio
async def test_checkpointer_publishes_saves_and_readers_fall_back_to_disk(
    tmp_path: Path,
) -> None:
    """save(publish=True) publishes the staged bytes as version `step`; ckpt.publish()
    numbers by step too; with no publisher, follow(source="auto") reads the disk."""
    root = tmp_path / "ckpt"
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save(fill(5.0), step=5, publish=True)
        async with aiodcp.follow(root, source="memory") as versions:
            async with await versions.__anext__() as version:
                assert version.number == 5
                assert bool((version.state_dict()["b"] == 5).all())
            await handle
            assert await ckpt.publish(fill(6.0)) == 6
            async with await versions.__anext__() as version:
                assert version.number == 6 and version.state_dict()["step"] == 6
            with pytest.raises(ValueError, match="not newer"):
                await ckpt.publish(fill(1.0), version=6)
    mine = fill(0.0)
    async with aiodcp.follow(root, source="auto", poll_interval=0.05) as versions:
        async with await versions.__anext__() as version:  # no publisher now: the disk
            assert version.number == 5 and version.source == "disk"
            await version.copy_into(mine)
            with pytest.raises(aiodcp.CheckpointError, match="from disk"):
                version.state_dict()
    assert bool((mine["a"] == 5).all()) and mine["step"] == 5
    assert not memfds(name="memfd:aiodcp-") and not mapped(name="memfd:aiodcp-")  # spares too


# ------------------------------------------------------------ unit: no processes
def test_an_unsealed_memfd_is_refused() -> None:
    """A reader maps only a version sealed against writes, shrinking and growing."""
    fd = os.memfd_create("aiodcp-version-x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 8192)
        header = pickle.dumps(([], {}))
        os.pwrite(fd, header, 4096)
        with pytest.raises(aiodcp.CheckpointError, match="not sealed"):
            Mapped(fd, 0, 4096, len(header))
    finally:
        os.close(fd)


def test_a_header_may_name_no_global() -> None:
    """The header unpickler admits dict and list, nothing else (no code from a peer)."""
    assert _HeaderUnpickler(io.BytesIO(pickle.dumps(([], {"a": [1]})))).load() == ([], {"a": [1]})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        _HeaderUnpickler(io.BytesIO(pickle.dumps(os.system))).load()


def test_the_wire_checks_who_sends_what() -> None:
    """Frames are fixed-size; a Granted needs an Acquire and a descriptor; a Release
    needs a lease; a reader may not announce."""
    reader, publisher = w.Wire(w.Side.READER), w.Wire(w.Side.PUBLISHER)
    reader.receive(publisher.send(w.Hello(w.PROTOCOL, 1)) + publisher.send(w.Announce(4)))
    assert reader.next_message() == (w.Hello(w.PROTOCOL, 1), None)
    assert reader.next_message() == (w.Announce(4), None)
    publisher.receive(reader.send(w.Acquire(4)))
    assert publisher.next_message() == (w.Acquire(4), None)
    reader.receive(publisher.send(w.Granted(4, 10, 4096, 20)), [99])
    assert reader.next_message() == (w.Granted(4, 10, 4096, 20), 99)
    publisher.receive(reader.send(w.Release(4)) + reader.send(w.Release(4)))
    assert publisher.next_message() == (w.Release(4), None)
    with pytest.raises(ProtocolError, match="no such lease"):
        publisher.next_message()
    fresh = w.Wire(w.Side.READER)
    fresh.receive(w.encode(w.Hello(w.PROTOCOL, 1)) + w.encode(w.Granted(1, 0, 0, 0)))
    fresh.next_message()
    with pytest.raises(ProtocolError, match="answers no Acquire"):
        fresh.next_message()
    with pytest.raises(ProtocolError, match="may not send"):
        w.Wire(w.Side.READER).send(w.Announce(1))
    with pytest.raises(ProtocolError, match="not a publication frame"):
        w.decode(b"XX" + bytes(w.FRAME - 2))


def test_an_object_store_root_is_refused_for_publication() -> None:
    """Publication is same-host: an s3:// root is refused at once by Publisher and
    follow(), never taken for a local path named 's3:'."""
    for make in (lambda: aiodcp.Publisher("s3://bucket/run"), lambda: aiodcp.follow("s3://b/r")):
        with pytest.raises(ValueError, match="needs a local root"):
            make()
    assert not Path("s3:").exists()


# ------------------------------------------------------------ races (adversarial)
@pytest.mark.asyncio
async def test_a_reader_dying_with_two_acquires_in_flight_leaves_no_lease(tmp_path: Path) -> None:
    """A reader that asked twice (a cancelled __anext__, then another) and died before the
    answers: the first Granted fails to leave (EPIPE), the second Acquire in the same read
    must not count a lease nobody can release (a ring of one would stay full for ever)."""
    import socket

    from aiodcp._parent._pubconn import socket_name

    root = str(tmp_path / "root")
    async with aiodcp.Publisher(root, ring=1, when_full="skip") as pub:
        await pub.publish(fill(0.0), version=0)
        name = await anyio.to_thread.run_sync(socket_name, root)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
            sock.connect(name)
            await until(lambda: pub.readers == 1)  # accepted; its Hello has left
            wire = w.Wire(w.Side.READER)
            assert sock.send(wire.send(w.Acquire(0)) + wire.send(w.Acquire(0))) == 2 * w.FRAME
        # dead before the publisher reads either
        await until(lambda: pub.readers == 0)
        assert pub.live == {0: 0}
        assert await pub.publish(fill(1.0), version=1) == 1


def test_a_version_sealed_while_the_publisher_closes_is_not_left_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy thread that finishes a version (save(publish=True)) while the publisher
    closes: the version is closed, never parked in an inbox nobody reads (a memfd left
    open) nor announced through a closed (or reused) wake-up descriptor."""
    import threading

    from aiodcp._parent import _publish
    from aiodcp._staging._versions import seal_from_state

    root = str(tmp_path / "root")
    box: dict[str, object] = {}
    real_close = os.close

    def close(fd: int) -> None:
        real_close(fd)
        pub = box.get("pub")
        if pub is not None and fd == box.get("wake_r") and "thread" not in box:
            ticket = box["ticket"]

            def finish() -> None:
                try:
                    ticket._finish(seal_from_state(fill(1.0), 1))  # type: ignore[attr-defined]
                except BaseException as exc:  # reported below
                    box["error"] = exc

            thread = threading.Thread(target=finish)
            box["thread"] = thread
            thread.start()
            thread.join(1.0)  # done at once unless the close holds the inbox

    async def main() -> None:
        async with aiodcp.Publisher(root) as pub:
            await pub.publish(fill(0.0), version=0)
            box["ticket"] = await pub.reserve(1)
            box["wake_r"] = pub._wake_r
            box["pub"] = pub
            monkeypatch.setattr(_publish.os, "close", close)

    before = len(memfds())
    anyio.run(main)
    monkeypatch.undo()
    thread = box["thread"]
    assert isinstance(thread, threading.Thread)
    thread.join(30)
    assert "error" not in box, box.get("error")
    assert len(memfds()) == before


@pytest.mark.asyncio
async def test_a_connection_the_publisher_never_served_is_not_its_death(tmp_path: Path) -> None:
    """A reader that connects while a publisher closes (in its listen backlog, never
    greeted) was not served: it waits for the next publisher, as with none at all,
    instead of raising PublisherGoneError for a publisher it never followed."""
    import socket

    from aiodcp._parent._pubconn import socket_name

    root = str(tmp_path / "root")
    name = await anyio.to_thread.run_sync(socket_name, root)
    got: list[int] = []
    async with aiodcp.follow(root, source="memory", poll_interval=0.05) as versions:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as closing:
            closing.bind(name)
            closing.listen(8)

            async def first() -> None:
                async with await versions.__anext__() as version:
                    got.append(version.number)

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await anyio.sleep(0.3)  # the reader is in the backlog now
                closing.close()  # the "publisher" goes without a word
                await anyio.sleep(0.3)
                async with aiodcp.Publisher(root) as pub:
                    await pub.publish(fill(3.0), version=3)
                    with anyio.fail_after(60):
                        while not got:  # noqa: ASYNC110  (the reader's task sets it)
                            await anyio.sleep(0.02)
    assert got == [3]


def test_the_ring_counts_places_and_closes_what_leaves() -> None:
    """The ring's bookkeeping alone: the latest and the leased versions stay, a place is
    pinned by a lease or a reserved ticket, a late older version is closed unannounced,
    and a gone reader's recorded leases are given back."""
    from aiodcp._parent._ring import Ring
    from aiodcp._staging._versions import Sealed

    closed: list[int] = []

    class FakeSealed(Sealed):
        def close(self) -> None:
            closed.append(self.nbytes)

    ring = Ring(2)
    assert ring.check_version(None) == 0 and not ring.full()
    ring.reserve("t0", 0)
    ring.reserve("t1", 1)
    assert ring.full()  # two tickets pin both places
    assert ring.install("t1", 1, FakeSealed(-1, 1, 0, 0))
    assert not ring.install("t0", 0, FakeSealed(-1, 0, 0, 0)) and closed == [0]  # late
    assert ring.acquire(1) is not None and ring.acquire(7) is None
    ring.reserve("t2", 2)
    assert ring.full() and ring.leases() == {1: 1}
    assert ring.install("t2", 2, FakeSealed(-1, 2, 0, 0))
    assert ring.leases() == {1: 1, 2: 0} and closed == [0]  # 1 is leased: it stays
    ring.release_all({1: 1})
    ring.trim()
    assert ring.leases() == {2: 0} and closed == [0, 1]
    with pytest.raises(ValueError, match="not newer"):
        ring.check_version(2)
    with pytest.raises(ValueError, match="ring must be"):
        Ring(0)


@pytest.mark.asyncio
async def test_a_spare_of_an_old_size_is_replaced(tmp_path: Path) -> None:
    """The spare memfd is made for the last version's size; when the published state
    changes size, the old spare (a whole version of memory) is dropped and one of the
    new size made, instead of being kept unused for ever."""
    root = str(tmp_path / "root")

    def spare_bytes(pub: aiodcp.Publisher) -> int | None:
        ready = pub._spare._ready
        return None if ready is None else ready[4]

    big = {"w": torch.ones(1 << 20)}  # 4 MiB
    small = {"w": torch.ones(1 << 10)}  # 4 KiB
    async with aiodcp.Publisher(root) as pub:
        await pub.publish(big)
        await until(lambda: spare_bytes(pub) == 4 << 20)
        await pub.publish(small)  # the spare does not fit: allocated as it goes
        await until(lambda: spare_bytes(pub) == 4 << 10, within=10)
        assert len(mapped(name="memfd:aiodcp-version")) == 1  # the new spare only


@pytest.mark.asyncio
async def test_a_reader_the_learner_has_no_descriptor_for_does_not_crash_it(
    tmp_path: Path,
) -> None:
    """A learner at its open-files limit when a reader connects (EMFILE on accept): the
    publisher logs it and accepts later, once a descriptor is free; when it asks for a
    version then (EMFILE on the descriptor's dup), that reader alone is dropped, its
    lease given back. The learner's own code goes on and publishes: a reader's
    connection must never crash the learner."""
    import resource
    import socket

    from aiodcp._parent._pubconn import socket_name

    root = str(tmp_path / "root")
    name = await anyio.to_thread.run_sync(socket_name, root)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with aiodcp.Publisher(root) as pub:
        await pub.publish(fill(0.0), version=0)
        await anyio.sleep(0.3)  # the spare is made: no descriptor needed but the accept's
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        fillers: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (client.fileno() + 8, hard))
            try:
                with contextlib.suppress(OSError):
                    while True:  # take every number left below the limit
                        fillers.append(os.dup(client.fileno()))
                client.connect(name)  # in the backlog: accept() has no fd for it
                await anyio.sleep(0.3)
                assert pub.readers == 0
            finally:
                while fillers:
                    os.close(fillers.pop())
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await until(lambda: pub.readers == 1, within=10)
            assert await pub.publish(fill(1.0), version=1) == 1
            # no descriptor to send a version with: that reader is dropped, nobody else
            resource.setrlimit(resource.RLIMIT_NOFILE, (client.fileno() + 8, hard))
            try:
                with contextlib.suppress(OSError):
                    while True:
                        fillers.append(os.dup(client.fileno()))
                client.send(w.Wire(w.Side.READER).send(w.Acquire(1)))
                await until(lambda: pub.readers == 0, within=10)
            finally:
                while fillers:
                    os.close(fillers.pop())
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert pub.live == {1: 0}
            assert await pub.publish(fill(2.0), version=2) == 2
        finally:
            client.close()
