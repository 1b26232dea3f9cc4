"""The torch step of scripts/setup.sh: install the CPU build of torch 2.13.0 where no NVIDIA GPU is present.

A plain ``pip install torch==2.13.0`` on Linux resolves to the multi-GB CUDA build. So, without ``nvidia-smi`` on
PATH, torch is installed from PyTorch's CPU wheel index (``--index-url``, override with ``$ZHILING_TORCH_INDEX``).
That index is probed first with a short timeout; where it cannot be reached (offline, a mirror-only machine) set-up
prints one line and falls back to the plain ``pip install torch==2.13.0`` (whatever the pip configuration finds).
With an NVIDIA GPU nothing is done here: ``pip install -e .`` then brings the CUDA build that ``torch>=2.4``
resolves to.

    python scripts/install_torch.py [PIP_ARGS ...]    # extra arguments go to pip install (e.g. -q, --dry-run)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import urllib.request

TORCH = "torch==2.13.0"
INDEX_VAR = "ZHILING_TORCH_INDEX"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_SECONDS = 5.0


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def index_reachable(index: str, timeout: float = PROBE_SECONDS) -> bool:
    """True when ``INDEX/torch/`` answers 200 within ``timeout`` seconds (name resolution included)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout) as response:
                answer.append(response.status == 200)
        except Exception:  # any failure (DNS, refused, TLS, HTTP error) means: use the fallback
            answer.append(False)

    # urlopen's timeout does not cover name resolution, so the probe runs in a thread with a deadline of its own
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answer and answer[0])


def pip_install(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pip", "install", *args])


def main(pip_args: list[str]) -> int:
    if has_nvidia_gpu():
        print("torch: NVIDIA GPU found (nvidia-smi); the package's dependencies bring the CUDA build of torch")
        return 0
    index = os.environ.get(INDEX_VAR) or CPU_INDEX
    if index_reachable(index):
        print(f"torch: no NVIDIA GPU; installing the CPU build of {TORCH} from {index}")
        code = pip_install(["--index-url", index, TORCH, *pip_args])
        if code == 0:
            return 0
        print(f"torch: installing from {index} failed (exit {code}); falling back to pip's own indexes "
              f"(pip install {TORCH}, which may be the CUDA build)")
    else:
        print(f"torch: no NVIDIA GPU, but the CPU wheel index {index} cannot be reached ({PROBE_SECONDS:.0f} s probe); "
              f"falling back to pip install {TORCH} from pip's own indexes (from PyPI on Linux: the CUDA build)")
    return pip_install([TORCH, *pip_args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
