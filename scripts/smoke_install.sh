#!/usr/bin/env bash
# The user's road: build the wheel, install it into a fresh venv with its declared
# dependencies only (no extras, so no numpy), then save/load/verify a real model several
# times (repeated tensor kinds: record templates are used) and run the CLI there.
#
#   scripts/smoke_install.sh [TORCH_SPEC]     default: torch==2.13.0
#
# TORCH_SPEC picks the torch installed first (e.g. "torch==2.7.1" for the lowest torch
# aiodcp declares); the wheel's own dependencies come after it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${1:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d -t aiodcp-smoke-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . 2>/dev/null \
    || "$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" .
"$PYTHON" -m venv "$WORK/venv"  # no --system-site-packages: declared dependencies only
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q "$WORK"/dist/aiodcp-*.whl

if "$VPY" -c "import numpy" 2>/dev/null; then
    echo "smoke: numpy is installed in the fresh venv; it must not be" >&2
    exit 1
fi

cd "$WORK"  # away from the source tree: the installed wheel is what gets imported
"$VPY" - <<'EOF'
import asyncio
import time

import torch

import aiodcp

assert "site-packages" in aiodcp.__file__, aiodcp.__file__


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
        torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4),
    )
    return model, torch.optim.AdamW(model.parameters())


async def main() -> None:
    torch.manual_seed(0)
    model, opt = make()
    async with aiodcp.AsyncCheckpointer("ck", keep_last=2) as ckpt:
        for step in range(4):  # the first save learns each kind; the next ones use it
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            await (await ckpt.save({"model": model, "optim": opt}, step=step))
    fresh, fresh_opt = make()
    step = await aiodcp.load({"model": fresh, "optim": fresh_opt}, "ck", verify=True)
    assert step == 3, step
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # a second checkpointer's daemon is forked from the warm fork server: no torch import
    t0 = time.perf_counter()
    async with aiodcp.AsyncCheckpointer("ck") as ckpt:
        entered = time.perf_counter() - t0
        with open(f"/proc/{ckpt.daemon_pid}/stat") as f:
            server = f.read().rsplit(")", 1)[1].split()[1]
        with open(f"/proc/{server}/comm") as f:
            assert f.read().strip() == "aiodcp-forksrv"
        await (await ckpt.save({"model": model, "optim": opt}, step=4))
    print(f"smoke: torch {torch.__version__}: 5 saves, load of step {step} bit-exact, "
          f"a forked daemon ready in {entered * 1000:.0f} ms")


asyncio.run(main())
EOF
AIODCP="$WORK/venv/bin/aiodcp"
"$AIODCP" ls ck | grep -q "step 4"
"$AIODCP" verify ck | grep -q "step 4: ok (checksums)"
"$AIODCP" inspect ck --json | "$VPY" -c "import json, sys; assert json.load(sys.stdin)['step'] == 4"
echo "smoke: CLI ls/verify/inspect ok; $(( $(date +%s) - start )) s"
