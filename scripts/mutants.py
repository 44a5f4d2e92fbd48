"""A small, fast mutation check: break a copy of aiodcp on purpose, expect a test to fail.

Each mutant below is one exact text replacement in one module (the anchor must occur
exactly once, or the script stops: a mutant that no longer applies is an error, not a
pass) and the few tests that must fail on it. For each mutant the repository's
``aiodcp/``, ``tests/`` and ``pyproject.toml`` are copied to a temporary directory, the
patch is applied there (the checkout is never touched), and pytest runs the targeted
tests against the copy. KILLED: a test failed. SURVIVED: every test passed -- the tests
no longer pin the behaviour the mutant removes. Exit status 1 if any survived.

    python scripts/mutants.py              # every mutant
    python scripts/mutants.py no-copy ...  # only these
    python scripts/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "no-commit",
        "commit() returns before the rename: nothing is ever published",
        "aiodcp/_disk/_storage.py",
        '    _fault_point("before_rename")\n',
        '    _fault_point("before_rename")\n    return final\n',
        (
            "tests/test_checkpointer.py::test_save_returns_once_staged_and_commits_plain_dcp[asyncio]",
        ),
    ),
    Mutant(
        "no-copy",
        "Arena.stage copies nothing (the arena keeps what it had: zeros at first)",
        "aiodcp/_staging/_arena.py",
        "                torch._foreach_copy_(cpu_dst[lo : lo + _COPY_CHUNK], "
        "cpu_src[lo : lo + _COPY_CHUNK])\n",
        "                pass\n",
        ("tests/test_staging.py::test_staged_copy_is_independent_of_later_mutation",),
    ),
    Mutant(
        "no-cancel",
        "SaveHandle.cancel() does nothing (and says it did)",
        "aiodcp/_parent/_handle.py",
        "        self._cancel_requested = True\n"
        "        if self._cancel_hook is not None:\n"
        "            self._cancel_hook(self)\n"
        "        return True\n",
        "        return True\n",
        ("tests/test_faults.py::test_handle_cancel_while_persisting_publishes_nothing",),
    ),
    Mutant(
        "no-hold",
        "hold_step() creates its lease file but takes no lock on it: no lease",
        "aiodcp/_disk/_retention.py",
        "        fcntl.flock(fd, fcntl.LOCK_SH)\n        return fd\n",
        "        return fd\n",
        ("tests/test_watch.py::test_hold_keeps_a_step_through_keep_last_1[asyncio]",),
    ),
    Mutant(
        "hold-always-raises",
        "hold() raises CheckpointNotFoundError for every step",
        "aiodcp/_disk/_retention.py",
        "        if not (step_dir(root, step) / METADATA).is_file():\n",
        "        if True:\n",
        ("tests/test_watch.py::test_watcher_in_another_process_sees_every_commit[asyncio]",),
    ),
    Mutant(
        "no-munmap",
        "the daemon never unmaps a released arena",
        "aiodcp/_staging/_arena.py",
        "            _libc().munmap(ctypes.c_void_p(addr), ctypes.c_size_t(self.size))\n",
        "            pass\n",
        ("tests/test_ownership.py::test_released_arenas_are_unmapped_with_the_gc_off",),
    ),
    Mutant(
        "arena-never-closed",
        "Arena.close() keeps the memfd open",
        "aiodcp/_staging/_arena.py",
        "        if self.fd >= 0:\n            os.close(self.fd)\n            self.fd = -1\n",
        "",
        ("tests/test_ownership.py::test_prepare_during_save_never_shares_a_slot",),
    ),
    Mutant(
        "copy-on-loop",
        "save() makes an extra full copy of the state on the event loop's thread",
        "aiodcp/_parent/_saving.py",
        "        stream = _cuda_stream()\n",
        "        stream = _cuda_stream()\n"
        "        import torch\n\n"
        "        torch.cat([v.reshape(-1) for v in state_dict.values()"
        " if isinstance(v, torch.Tensor)])\n",
        ("tests/test_checkpointer.py::test_event_loop_keeps_ticking_during_a_large_save[asyncio]",),
    ),
    Mutant(
        "daemon-drops-replies",
        "the daemon drops a frame when its socket is full instead of waiting",
        "aiodcp/_daemon/_daemon.py",
        "                self.sock.sendall(frame)\n                return True\n",
        "                try:\n"
        "                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)\n"
        "                except BlockingIOError:\n"
        "                    return True  # dropped\n"
        "                if sent < len(frame):\n"
        "                    self.sock.sendall(frame[sent:])\n"
        "                return True\n",
        ("tests/test_ownership.py::test_a_busy_loop_delays_replies_but_never_mutes_the_daemon",),
    ),
    Mutant(
        "decoder-rejects-truncated",
        "decode_frame() raises on a frame whose body has not all arrived",
        "aiodcp/_wire/_protocol.py",
        "    if len(buf) < end:\n        return None\n",
        '    if len(buf) < end:\n        raise ProtocolError("truncated frame")\n',
        ("tests/test_protocol.py::test_fuzz_truncated_and_mutated_frames",),
    ),
    Mutant(
        "kill-points-after-rename-never-fire",
        "the test hook kills the daemon before the rename only",
        "aiodcp/_disk/_storage.py",
        "    if os.environ.get(KILL_AT_ENV) == point:\n",
        '    if os.environ.get(KILL_AT_ENV) == point == "before_rename":\n',
        ("tests/test_commit_faults.py::test_kill_at_each_commit_step_then_reconcile[after_log]",),
    ),
]


def apply(mutant: Mutant, tree: Path) -> None:
    """Apply ``mutant`` to the copy in ``tree``; fail loudly if its anchor is not unique."""
    path = tree / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name}: its anchor occurs {count} times in {mutant.path} "
            f"(expected once); update the mutant:\n{mutant.old}"
        )
    path.write_text(text.replace(mutant.old, mutant.new))


BASELINE_NAME = "baseline"
BASELINE = Mutant("baseline", "no mutation: every targeted test must pass", "", "", "", ())


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"aiodcp-mutant-{mutant.name}-") as tmp:
        tree = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("aiodcp", "tests"):
            shutil.copytree(REPO / name, tree / name, ignore=ignore)
        shutil.copy2(REPO / "pyproject.toml", tree / "pyproject.toml")
        if mutant.name != BASELINE_NAME:
            apply(mutant, tree)
        # The copy's aiodcp first, for pytest and for every script a test starts (some
        # run with another working directory; an editable install would win there).
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        cmd += ["-o", "addopts=", *mutant.tests]
        try:
            proc = subprocess.run(
                cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "KILLED (timeout)", time.perf_counter() - t0, ""
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        if proc.returncode == 0:
            return "SURVIVED", time.perf_counter() - t0, tail
        if proc.returncode in (1,):  # tests failed (2-5: pytest itself could not run)
            return "KILLED", time.perf_counter() - t0, tail
        raise SystemExit(
            f"mutant {mutant.name}: pytest could not run (rc {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unmutated run of the tests"
    )
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:38} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    t0 = time.perf_counter()
    if not args.no_baseline:
        # A test that fails without any mutant would "kill" every mutant: check first.
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = Mutant(**{**BASELINE.__dict__, "tests": tests})
        verdict, seconds, tail = run(baseline, args.timeout * 2)
        print(f"{'baseline':18} {'(unmutated)':38} {seconds:6.1f} s", flush=True)
        if verdict != "SURVIVED":
            print("the targeted tests fail on the unmutated code:\n" + tail)
            return 2
    survived = []
    for m in chosen:
        verdict, seconds, tail = run(m, args.timeout)
        print(f"{verdict:18} {m.name:38} {seconds:6.1f} s  ({', '.join(m.tests)})", flush=True)
        if verdict == "SURVIVED":
            survived.append(m.name)
            print("    " + tail.replace("\n", "\n    "), flush=True)
    total = time.perf_counter() - t0
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed in {total:.0f} s")
    if survived:
        print("SURVIVED (a test should have failed):", ", ".join(survived))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
