"""What ``aiodcp verify`` prints, for a local root and an object-store root alike."""

from __future__ import annotations

import json
from typing import Any


def print_verify(rows: list[dict[str, Any]], root: object, as_json: bool) -> int:
    """Print each step's verdict (text or JSON); the exit code: 1 if any step failed."""
    bad = [r for r in rows if not r["ok"]]
    if as_json:
        print(json.dumps({"root": str(root), "ok": not bad, "steps": rows}, indent=2))
    else:
        for r in rows:
            if r["ok"]:
                print(f"step {r['step']}: ok ({r['checked']})")
            else:
                print(f"step {r['step']}: FAILED: {r['error']}")
        if not rows:
            print(f"no committed steps in {root}")
    return 1 if bad else 0
