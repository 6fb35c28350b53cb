# Sourced by scripts/test and scripts/demo: make sure .venv exists and holds the project.
# torch is pinned first: an unpinned torch asked for before one is installed pulls a multi-GB
# CUDA build; with 2.13.0 present, pyproject's torch>=2.2 installs nothing more.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ]; then
    echo "setting up $ROOT/.venv (1/3: the virtual environment)" >&2
    "${PYTHON:-python3}" -m venv "$ROOT/.venv"
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setting up $ROOT/.venv (2/3: torch ${TORCH_VERSION:-2.13.0}, the largest step: a minute or more)" >&2
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
stamp="$ROOT/.venv/.zmqmodels-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "setting up $ROOT/.venv (3/3: zmqmodels and its dependencies, editable)" >&2
    "$PY" -m pip install -q -e "$ROOT[all,test]"
    touch "$stamp"
    echo "ready: activate it with 'source .venv/bin/activate' to run 'zmqmodels' yourself" >&2
fi
