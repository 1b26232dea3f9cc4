#!/usr/bin/env bash
# System packages the test suite needs, from Debian's packages (root or sudo, apt):
#   - headless Chromium (+ a CJK font) for the web UI's browser test (tests/test_webui.py, marker `browser`);
#     Playwright drives /usr/bin/chromium, its own browser download is never used;
#   - Go, whose text/template checks the Ollama Modelfile TEMPLATE zhiling writes (tests/test_export_modelfile.py).
# Does nothing for what is already installed. `bash scripts/setup.sh dev` runs it.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium chromium-driver fonts-noto-cjk)
command -v go >/dev/null 2>&1 || need+=(golang-go)
if [ ${#need[@]} -eq 0 ]; then
    echo "system test dependencies are installed: $(/usr/bin/chromium --version 2>/dev/null), $(go version)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps.sh: apt-get not found; install ${need[*]} by other means" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "install_system_deps.sh: run as root (or install sudo) to install ${need[*]}" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${need[@]}"
echo "installed: ${need[*]}"
