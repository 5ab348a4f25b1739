#!/usr/bin/env bash
# Creates .venv (once) and installs mixcl_ray with its test tools.
# torch goes in first and explicitly, so that no requirement can pull a multi-GB CUDA build on a
# machine without a GPU: set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
python -c "import torch, ray, monai, mlflow, pyarrow, nibabel; print(f'mixcl_ray environment ready: torch {torch.__version__}, ray {ray.__version__}, monai {monai.__version__}')"
