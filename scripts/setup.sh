#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, offline-friendly.
# torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# sed (not grep -v) drops pip's noise about absent local indexes and, under pipefail, keeps pip's exit code.
quiet() { sed '/^WARNING: Location .* is ignored/d'; }
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0" 2>&1 | quiet
.venv/bin/pip install -q -e ".[dev]" 2>&1 | quiet
.venv/bin/python -c "import harness, torch, transformers; print('npu-harness', harness.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
# The numba kernels compile once here (~30 s, then cached beside the package), not in the first gate.
.venv/bin/python -m harness.warmup
