"""The CLI's ``ls``, ``inspect``, ``verify`` and ``gc`` on an object-store root.

Everything read goes through the same checks as for a local root: a step is
downloaded into a private temporary directory and checked there by
:func:`aiodcp._disk._manifest.verify` (``.metadata`` through the restricted unpickler).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from ._report import print_verify

__all__ = ["gc", "ls", "metadata", "verify"]


def ls(store: Any, args: argparse.Namespace) -> int:
    steps = store.list_steps()
    latest = steps[-1] if steps else None
    rows = [
        {
            "step": step,
            "path": store.step_path(step),
            "bytes": sum(store.step_sizes(step).values()),
            "committed": True,
            "latest": step == latest,
        }
        for step in steps
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        mark = "  (latest)" if r["latest"] else ""
        print(f"{'step ' + str(r['step']):<40}{r['bytes'] / 2**20:>10.1f} MiB  {r['path']}{mark}")
    return 0


def metadata(store: Any, step: int | None) -> tuple[int, str, Any]:
    """The step (the latest by default), its URL and its DCP metadata (read safely)."""
    from .._disk._safe import load_metadata

    step = step if step is not None else store.latest()
    if step is None:
        raise CheckpointError(f"no committed checkpoint in {store}")
    with tempfile.TemporaryDirectory(prefix="aiodcp-inspect-") as tmp:
        local = store.download_step(step, Path(tmp), names=[".metadata"])
        return step, store.step_path(step), load_metadata(local, step)


def verify(store: Any, args: argparse.Namespace) -> int:
    from .._disk._manifest import read_manifest
    from .._parent._load_remote import download_verified

    steps = store.list_steps() if args.step is None else [args.step]
    rows: list[dict[str, Any]] = []
    for step in steps:
        row: dict[str, Any] = {"step": step, "path": store.step_path(step), "ok": True}
        row["file"] = None
        try:
            with tempfile.TemporaryDirectory(prefix="aiodcp-verify-") as tmp:
                local = download_verified(store, step, Path(tmp), checksums=True)
                manifest = read_manifest(local, step=step)
            row["checked"] = "checksums" if manifest is not None else "sizes (no aiodcp manifest)"
        except CheckpointError as exc:
            row.update(ok=False, error=str(exc), file=getattr(exc, "file", None))
        rows.append(row)
    return print_verify(rows, store, args.json)


def gc(store: Any, args: argparse.Namespace) -> int:
    """Abort aiodcp's multipart uploads under uncommitted steps and delete the objects of
    interrupted saves, holding the root's writer lock (refused while a checkpointer
    writes there)."""
    if args.dry_run:
        print("--dry-run is not supported for an object-store root", flush=True)
        return 1
    store.lock_writer()
    try:
        for what in store.cleanup_leftovers():
            print(f"removed {what}")
    finally:
        store.close_writer()
    return 0
