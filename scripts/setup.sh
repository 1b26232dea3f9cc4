#!/usr/bin/env bash
# Set up zhiling in ./.venv on a fresh machine (Python 3.10+, pip, a C compiler).
#   bash scripts/setup.sh        # the package and what `zhiling quickstart` needs
#   bash scripts/setup.sh dev    # plus everything the test suite needs (QLoRA, server, web UI, GGUF, browser)
# Where no NVIDIA GPU is present, the CPU build of torch 2.13.0 is installed first from PyTorch's CPU wheel index
# ($ZHILING_TORCH_INDEX overrides it), so pip does not pull a multi-GB CUDA build; where that index cannot be reached
# (5 s probe) it falls back to plain `pip install torch==2.13.0` (see scripts/install_torch.py).
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
python="${PYTHON:-python3}"

# Always ./.venv, even inside another activated environment: the README's commands run .venv/bin/...
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip
python scripts/install_torch.py -q
case "$mode" in
    run) pip install -q -e . ;;
    dev)
        # llama-cpp-python builds from source; a portable (non -march=native) build can be cached and reused.
        export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
        pip install -q -e ".[dev]"
        bash scripts/install_system_deps.sh
        ;;
    *) echo "usage: bash scripts/setup.sh [run|dev]" >&2; exit 2 ;;
esac
echo "zhiling is installed in $(dirname "$(dirname "$(command -v python)")")"
