#!/usr/bin/env bash
# One command for a GPU machine: CUDA + overlap tests, then the staging benchmark.
# Python: .venv if its torch sees CUDA, else a venv over the system python's CUDA torch
# (--system-site-packages, so torch is never reinstalled). Log: ${OUT:-.}/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-.}"
LOG="$(cd "${OUT:-.}" && pwd)/gpu_check.log"
exec > >(tee "$LOG") 2>&1

cuda_torch() { "$1" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

if [[ -x .venv/bin/python ]] && cuda_torch .venv/bin/python; then
    PY=.venv/bin/python
elif cuda_torch python3; then
    [[ -x .venv-gpu/bin/python ]] || python3 -m venv --system-site-packages .venv-gpu
    PY=.venv-gpu/bin/python
else
    echo "gpu_check: no python with a CUDA torch: the CUDA tests will be skipped"
    PY=python3
    [[ -x .venv/bin/python ]] && PY=.venv/bin/python
fi
echo "gpu_check: $PY, torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

# torch already satisfies the requirement, so pip leaves it alone. Offline, the
# checkout is used in place with whatever test dependencies are importable.
if ! "$PY" -c 'import aiodcp, blockbuster, pytest_asyncio, pytest_timeout, uvloop' 2>/dev/null; then
    "$PY" -m pip install -q --no-build-isolation -e ".[test]" ||
        echo "gpu_check: pip install failed (offline?): using the checkout in place"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_overlap.py || status=$?
"$PY" scripts/gpu_bench.py || status=$?
echo "gpu_check: exit $status; log: $LOG"
exit "$status"
