"""The ``aiodcp`` command: ``ls``, ``gc`` and ``bench``. Built on argparse (stdlib, no deps).

Exit codes: 0 ok, 1 operation failed, 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import _storage
from ._errors import CheckpointError


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ls(args: argparse.Namespace) -> int:
    root = Path(args.root)
    if not root.is_dir():
        print(f"aiodcp: {root} is not a directory", file=sys.stderr)
        return 1
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
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(_storage.TMP_PREFIX):
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
        name = f"step {r['step']}" if r["committed"] else f"partial {Path(r['path']).name}"
        mark = "  (latest)" if r["latest"] else ""
        print(f"{name:<40}{r['bytes'] / 2**20:>10.1f} MiB  {when}{mark}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    root = Path(args.root)
    lock = _storage.WriterLock(root)
    try:
        lock.acquire()
    except CheckpointError as exc:
        print(f"aiodcp: {exc}", file=sys.stderr)
        return 1
    try:
        leftovers = [
            p
            for p in root.iterdir()
            if p.name.startswith((_storage.TMP_PREFIX, _storage.TRASH_PREFIX))
        ]
        if not args.dry_run:
            _storage.cleanup_leftovers(root)
        for p in leftovers:
            print(("would remove " if args.dry_run else "removed ") + str(p))
        return 0
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiodcp", description="aiodcp checkpoint tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_ls = sub.add_parser("ls", help="list steps (committed and partial) under ROOT")
    p_ls.add_argument("root")
    p_ls.add_argument("--json", action="store_true")
    p_gc = sub.add_parser("gc", help="remove leftovers of interrupted saves under ROOT")
    p_gc.add_argument("root")
    p_gc.add_argument("--dry-run", action="store_true")
    sub.add_parser("bench", help="benchmark against DCP (pass --help after it)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        from ._bench import main as bench

        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"ls": _ls, "gc": _gc}[args.cmd](args)
