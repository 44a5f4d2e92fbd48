"""The ``aiodcp`` command: ``ls``, ``inspect``, ``verify``, ``gc``, ``demo`` and ``bench``.

Built on argparse: it is in the standard library, so the package (which every daemon
imports at start-up) stays free of CLI dependencies, and six flat subcommands need
nothing more. Exit codes: 0 ok, 1 the operation failed, 2 bad usage (argparse), 141
(128 + SIGPIPE) when the reader of its output went away (``aiodcp ls ROOT | head -1``).

``ls``, ``verify`` (of steps with aiodcp's manifest) and ``gc`` do not import torch;
``ls``, ``inspect``, ``verify`` and ``gc --dry-run`` create nothing; a wrong path is one
line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._disk import _manifest, _retention, _storage
from .._errors import CheckpointError
from ._report import print_verify


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _Usage(Exception):
    """A wrong path or step: its message is the one line printed, exit 1."""


def _checkpoint_root(arg: str) -> Path:
    """``arg`` as a checkpoint root, or :class:`_Usage` saying why it is not one."""
    root = Path(arg)
    if not root.exists():
        raise _Usage(f"{root} does not exist")
    if not root.is_dir():
        raise _Usage(f"{root} is not a directory")
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise _Usage(f"{root} cannot be read: {exc.strerror}") from None
    markers = {_storage.LOCK, _storage.LATEST, _storage.COMMITS, _storage.HOLDS_DIR}
    if not any(
        n in markers
        or _storage.STEP_RE.match(n)
        or n.startswith((_storage.TMP_PREFIX, _storage.TRASH_PREFIX))
        for n in names
    ):
        raise _Usage(f"{root} is not a checkpoint directory (no step_N, latest or .lock in it)")
    return root


def _store(root: str) -> Any:
    """The root's store, parsed once (an unsupported URL is an error, never a local path);
    None after printing why it cannot be opened."""
    from .._disk._roots import open_store

    try:
        return open_store(root)
    except (ValueError, ImportError) as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return None


def _remote(args: argparse.Namespace) -> int | None:
    """An object-store root's command (:mod:`aiodcp._tools._cli_remote`); None for a local root."""
    store = _store(args.root)
    if store is None:
        return 1
    if not store.remote:
        return None
    from . import _cli_remote

    try:
        if args.cmd == "inspect":
            return _show_metadata(args, *_cli_remote.metadata(store, args.step))
        code: int = getattr(_cli_remote, args.cmd)(store, args)
    except CheckpointError as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return code


def _committed_step(root: Path, step: int) -> None:
    if not _storage.is_committed(root, step):
        raise _Usage(f"step {step} is not committed in {root}")


def _ls(args: argparse.Namespace) -> int:
    if (code := _remote(args)) is not None:
        return code
    root = _checkpoint_root(args.root)
    steps = _storage.list_steps(root)
    latest = steps[-1] if steps else None
    rows: list[dict[str, Any]] = []
    for step in steps:
        path = _storage.step_dir(root, step)
        rows.append(
            {
                "step": step,
                "path": str(path),
                "bytes": _size(path),
                "mtime": path.stat().st_mtime,
                "committed": True,
                "latest": step == latest,
            }
        )
    # not committed: aiodcp's saves in progress, and step_N/ without .metadata
    partial = [p for p in _retention.leftovers(root) if p.name.startswith(_storage.TMP_PREFIX)]
    partial += [_storage.step_dir(root, s) for s in _storage.incomplete_steps(root)]
    for entry in partial:
        rows.append(
            {
                "step": None,
                "path": str(entry),
                "bytes": _size(entry),
                "mtime": entry.stat().st_mtime,
                "committed": False,
                "latest": False,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["mtime"]))
        base = Path(r["path"]).name
        kind = "incomplete" if base.startswith("step_") else "partial"  # never aiodcp's
        name = f"step {r['step']}" if r["committed"] else f"{kind} {base}"
        mark = "  (latest)" if r["latest"] else ""
        print(f"{name:<40}{r['bytes'] / 2**20:>10.1f} MiB  {when}{mark}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if (code := _remote(args)) is not None:
        return code
    root = _checkpoint_root(args.root)
    try:
        step = args.step if args.step is not None else _storage.read_latest(root)
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {root}")
        _committed_step(root, step)
        metadata = _manifest.verify(_storage.step_dir(root, step), checksums=False)
    except CheckpointError as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return 1
    return _show_metadata(args, step, str(_storage.step_dir(root, step)), metadata)


def _show_metadata(args: argparse.Namespace, step: int, where: str, metadata: Any) -> int:
    rows: list[dict[str, Any]] = []
    for fqn, meta in sorted(metadata.state_dict_metadata.items()):
        props = getattr(meta, "properties", None)
        if props is None:
            rows.append({"key": fqn, "kind": "object"})
            continue
        shape = list(meta.size)
        numel = 1
        for d in shape:
            numel *= d
        itemsize = props.dtype.itemsize
        rows.append(
            {
                "key": fqn,
                "kind": "tensor",
                "dtype": str(props.dtype).removeprefix("torch."),
                "shape": shape,
                "bytes": numel * itemsize,
                "chunks": len(meta.chunks),
            }
        )
    if args.json:
        print(json.dumps({"step": step, "entries": rows}, indent=2))
        return 0
    print(f"step {step} ({where})")
    for r in rows:
        if r["kind"] == "object":
            print(f"  {r['key']:<40} python object")
        else:
            print(
                f"  {r['key']:<40} {r['dtype']:<10} {tuple(r['shape'])!s:<18}"
                f" {r['bytes'] / 2**20:>9.2f} MiB  {r['chunks']} chunk(s)"
            )
    total = sum(r.get("bytes", 0) for r in rows)
    print(f"  {len(rows)} entries, {total / 2**20:.2f} MiB of tensors")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Check steps against their manifests (sizes and xxh3_64): 0 all good, 1 a mismatch."""
    if (code := _remote(args)) is not None:
        return code
    root = _checkpoint_root(args.root)
    if args.step is not None:
        _committed_step(root, args.step)
    steps = _storage.list_steps(root) if args.step is None else [args.step]
    rows: list[dict[str, Any]] = []
    for step in steps:
        path = _storage.step_dir(root, step)
        row: dict[str, Any] = {"step": step, "path": str(path), "ok": True, "file": None}
        try:
            if not _storage.is_committed(root, step):
                raise CheckpointError(f"step {step} is not committed in {root}")
            manifest = _manifest.read_manifest(path)
            if manifest is not None:
                _check_manifest(path, step, manifest)
            else:  # a plain dcp.save directory: .metadata is all there is (needs torch)
                _manifest.verify(path, checksums=True)
            row["checked"] = "checksums" if manifest is not None else "sizes (no aiodcp manifest)"
        except CheckpointError as exc:
            row.update(ok=False, error=str(exc), file=getattr(exc, "file", None))
        rows.append(row)
    return print_verify(rows, root, args.json)


def _check_manifest(path: Path, step: int, manifest: dict[str, tuple[int, str]]) -> None:
    """Every file of the manifest has its committed size and xxh3_64, without torch.

    The commit checked ``.metadata`` against the files (every chunk present) before it
    wrote the manifest, and ``.metadata`` is among the files hashed here, so equal
    bytes mean the same, checked, checkpoint.
    """
    for name, (size, digest) in sorted(manifest.items()):
        file = path / name
        try:
            actual, got = _manifest.file_digest(file)
        except FileNotFoundError:
            raise CheckpointError(f"step {step}: checkpoint file {file} is missing") from None
        if actual != size:
            how = "truncated" if actual < size else "longer than committed"
            raise CheckpointError(
                f"step {step}: checkpoint file {file} is {how}: {actual} bytes, committed {size}"
            )
        if got != digest:
            raise CheckpointError(
                f"step {step}: checkpoint file {file} is corrupt: its xxh3_64 checksum "
                f"differs from the one committed ({digest})"
            )


def _demo(args: argparse.Namespace) -> int:
    import asyncio
    import shutil
    import tempfile

    if args.root:  # the user's: kept, and a second run resumes from it
        return asyncio.run(_demo_loop(args.root, args.steps, args.every, keep=True))
    root = tempfile.mkdtemp(prefix="aiodcp-demo-")
    try:
        return asyncio.run(_demo_loop(root, args.steps, args.every, keep=False))
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Progress:
    """One line per save. On a terminal it is live: redrawn in place (``\\r``, then
    erase to the end of the line) as the daemon reports its bytes written, and ended
    with the save's outcome; elsewhere (a pipe, a file, ``TERM=dumb``) only the outcome
    line is printed, a plain line per save.

    Hand-written rather than tqdm or rich: the events are already throttled by the
    daemon (ten a second at most), the line is short, and one save is live at a time
    in the demo; a library would add a dependency (rich: pygments and markdown-it too)
    for what ``\\r`` does. A user's own UI takes the same :class:`SaveEvent` from
    ``on_event`` and may feed tqdm or rich with it.
    """

    def __init__(self, out: Any = None) -> None:
        self.out = sys.stdout if out is None else out
        self.live = self.out.isatty() and os.environ.get("TERM") != "dumb"

    def __call__(self, event: Any) -> None:
        mib = event.total_bytes / 2**20
        if event.phase in ("committed", "failed", "skipped"):
            size = f"{mib:7.1f} MiB" if event.phase == "committed" else ""
            line = f"step {event.step:>4} {event.phase:<9} {size} {event.seconds:6.2f}s"
            self._print(line, end="\n")
        elif self.live:
            if event.phase == "staged":
                line = f"step {event.step:>4} staged, writing {mib:.1f} MiB"
            else:
                done = event.bytes_written / event.total_bytes if event.total_bytes else 0.0
                bar = "#" * int(done * 20)
                line = (
                    f"step {event.step:>4} {event.phase:<9} [{bar:<20}] "
                    f"{event.bytes_written / 2**20:7.1f}/{mib:.1f} MiB {event.seconds:6.2f}s"
                )
            self._print(line, end="")

    def _print(self, line: str, end: str) -> None:
        if self.live:
            line = f"\r{line}\x1b[K"  # over the live line, whatever the terminal's width
        print(line, end=end, file=self.out, flush=True)


async def _demo_loop(root: str, steps: int, every: int, *, keep: bool) -> int:
    import torch

    from .._errors import CheckpointNotFoundError
    from .._parent._checkpointer import AsyncCheckpointer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(
        f"demo: training a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
        f"MLP, checkpointing every {every} steps into {root}",
        flush=True,
    )
    progress = _Progress()
    async with AsyncCheckpointer(root, keep_last=2, on_event=progress) as ckpt:
        try:
            start = await ckpt.load({"model": model, "optim": opt}) + 1
            print(f"demo: resuming after step {start - 1}", flush=True)
        except CheckpointNotFoundError:
            start = 0
        for step in range(start, start + steps):
            x = torch.randn(64, 512)
            loss = (model(x) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % every == 0:
                await ckpt.save({"model": model, "optim": opt, "loss": loss.item()}, step=step)
        await ckpt.wait()
        kept = await ckpt.steps()
    print(f"demo: done; committed steps kept (keep_last=2): {kept}")
    if keep:
        print(f"demo: try `aiodcp ls {root}` and `aiodcp inspect {root}`")
    else:
        print("demo: removed its scratch directory; pass --root DIR to keep the checkpoints")
    return 0


def _gc(args: argparse.Namespace) -> int:
    if (code := _remote(args)) is not None:
        return code
    root = _checkpoint_root(args.root)
    if args.dry_run:  # reads only: no lock taken, nothing created
        for p in sorted(root.iterdir()):
            if p.name.startswith((_storage.TMP_PREFIX, _storage.TRASH_PREFIX)):
                print(f"would remove {p}")
        return 0
    lock = _storage.WriterLock(root)
    try:
        lock.acquire()
    except CheckpointError as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return 1
    try:
        leftovers = _retention.leftovers(root)  # only aiodcp's own names
        if not args.dry_run:
            _retention.cleanup_leftovers(root)
        for p in leftovers:
            print(("would remove " if args.dry_run else "removed ") + str(p))
        return 0
    finally:
        lock.release()


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default=None, help="comma-separated: big16, dense, moe, small100k")
    p.add_argument("--tensors", type=int, default=None, help="N equal tensors (instead of --shape)")
    p.add_argument("--mib", type=int, default=None, help="state size in MiB (default per shape)")
    p.add_argument("--sizes", default=None, help="big16 at these MiB, comma-separated")
    p.add_argument("--rounds", "--saves", type=int, default=3, help="interleaved rounds")
    p.add_argument(
        "--methods",
        default=None,
        help="a subset of sync,thread,process,aiodcp,overlap (all by default); with --train"
        " of none,sync,thread,process,stager,aiodcp,overlap,nice,thread1,buffered",
    )
    p.add_argument("--mem", action="store_true", help="aiodcp host memory (PSS) over many saves")
    p.add_argument("--rss-saves", type=int, default=20, help="aiodcp saves for --mem")
    p.add_argument("--save-timeout", type=float, default=120, help="seconds before a method fails")
    p.add_argument(
        "--daemon-niceness", type=int, default=None, help="aiodcp's daemon_niceness (shapes)"
    )
    p.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    train = p.add_argument_group("training throughput (--train)")
    train.add_argument("--train", action="store_true", help="time a CPU training loop instead")
    train.add_argument("--steps", type=int, default=24, help="training steps per run")
    train.add_argument("--every", default="4", help="save every K steps, comma-separated")
    train.add_argument("--batch", type=int, default=16, help="training batch size")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a closed pipe on stdout ends it quietly (exit 141, as ``cat``)."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except _Usage as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`| head`): the Python docs' recipe -- point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="aiodcp", description="aiodcp checkpoint tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_ls = sub.add_parser("ls", help="list steps (committed and partial) under ROOT")
    p_ls.add_argument("root")
    p_ls.add_argument("--json", action="store_true")
    p_in = sub.add_parser("inspect", help="tensors of a step: dtype, shape, bytes")
    p_in.add_argument("root")
    p_in.add_argument("--step", type=int, default=None, help="default: the latest")
    p_in.add_argument("--json", action="store_true")
    p_ver = sub.add_parser("verify", help="check steps' files against their checksums")
    p_ver.add_argument("root")
    p_ver.add_argument("--step", type=int, default=None, help="default: every step")
    p_ver.add_argument("--json", action="store_true")
    p_demo = sub.add_parser("demo", help="a short async training loop with checkpointing")
    p_demo.add_argument(
        "--root", default=None, help="kept, and resumed when run again (default: a scratch dir)"
    )
    p_demo.add_argument("--steps", type=int, default=60)
    p_demo.add_argument("--every", type=int, default=20)
    p_gc = sub.add_parser(
        "gc", help="remove leftovers of interrupted saves under ROOT (never a committed step)"
    )
    p_gc.add_argument("root")
    p_gc.add_argument("--dry-run", action="store_true")
    p_bench = sub.add_parser(
        "bench",
        help="benchmark against DCP: --shape big16|dense|moe|small100k, or --train",
        description="Side-by-side benchmark of sync dcp.save, dcp.async_save (THREAD, "
        "PROCESS) and aiodcp, in interleaved rounds; --train times a CPU training loop.",
    )
    _bench_arguments(p_bench)
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "bench":
        from ._bench import main as bench

        return bench(args, p_bench.error)
    commands = {"ls": _ls, "inspect": _inspect, "verify": _verify, "gc": _gc, "demo": _demo}
    return commands[args.cmd](args)
