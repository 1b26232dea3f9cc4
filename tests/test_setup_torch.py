"""scripts/install_torch.py, the torch step of scripts/setup.sh, against local stand-in indexes (no network):
the CPU wheel index when it answers, the plain pip fallback within seconds when it does not, nothing with a GPU.

pip runs with ``--dry-run --report`` and none of this machine's pip configuration, so the choice it makes is read
back from the report and no environment is changed."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.py"


def _fake_wheel(folder: Path, version: str) -> Path:
    """A tiny pure-Python wheel named like torch's (``torch-2.13.0+cpu-py3-none-any.whl``)."""
    name = f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f"__version__ = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / name, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return folder / name


@pytest.fixture
def indexes(tmp_path):
    """Two PEP 503 simple indexes on 127.0.0.1: /cpu (torch 2.13.0+cpu) and /pypi (torch 2.13.0, standing in
    for PyPI's CUDA build). Yields (base URL, list of requested paths)."""
    root = tmp_path / "www"
    for index, version in (("cpu", "2.13.0+cpu"), ("pypi", "2.13.0")):
        folder = root / index / "torch"
        folder.mkdir(parents=True)
        wheel = _fake_wheel(folder, version)
        (folder / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n', encoding="utf-8")
    requested = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requested.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _run(tmp_path, torch_index, fallback_index, gpu=False):
    """Run the torch step as setup.sh does, with pip isolated from this machine's configuration."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PATH=str(bin_dir), PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=fallback_index,
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", ZHILING_TORCH_INDEX=torch_index)
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--ignore-installed", "--no-deps", "-q",
                           "--report", str(report)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    chosen = None
    if report.exists():
        [item] = json.loads(report.read_text(encoding="utf-8"))["install"]
        chosen = (item["metadata"]["name"], item["metadata"]["version"], unquote(item["download_info"]["url"]))
    return done.stdout, chosen


def test_no_gpu_and_cpu_index_reachable_installs_the_cpu_build(tmp_path, indexes):
    base, requested = indexes
    out, chosen = _run(tmp_path, f"{base}/cpu", f"{base}/pypi")
    assert chosen == ("torch", "2.13.0+cpu", f"{base}/cpu/torch/torch-2.13.0+cpu-py3-none-any.whl")
    assert f"installing the CPU build of torch==2.13.0 from {base}/cpu" in out
    assert not any(path.startswith("/pypi") for path in requested)  # --index-url: only the CPU index is asked


def test_no_gpu_and_cpu_index_unreachable_falls_back_to_plain_pip(tmp_path, indexes):
    base, requested = indexes
    dead = f"http://127.0.0.1:{_closed_port()}/cpu"
    out, chosen = _run(tmp_path, dead, f"{base}/pypi")
    assert chosen == ("torch", "2.13.0", f"{base}/pypi/torch/torch-2.13.0-py3-none-any.whl")
    notices = [line for line in out.splitlines() if "cannot be reached" in line]
    assert len(notices) == 1 and dead in notices[0] and "falling back to pip install torch==2.13.0" in notices[0]


def test_gpu_present_leaves_torch_to_the_package_dependencies(tmp_path, indexes):
    base, requested = indexes
    out, chosen = _run(tmp_path, f"{base}/cpu", f"{base}/pypi", gpu=True)
    assert chosen is None and requested == []
    assert "NVIDIA GPU found" in out


def test_setup_sh_runs_the_torch_step():
    setup = (SCRIPT.parent / "setup.sh").read_text(encoding="utf-8")
    assert "python scripts/install_torch.py" in setup
    assert 'pip install -q "torch==2.13.0"' not in setup
