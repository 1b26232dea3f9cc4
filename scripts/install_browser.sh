#!/usr/bin/env bash
# Headless Chromium for the web UI's browser test (tests/test_webui.py, marker `browser`), from Debian's packages.
# Playwright drives this browser (executable_path=/usr/bin/chromium); Playwright's own browser download is never
# used. Needs root (or sudo) and apt; does nothing when Chromium is already installed.
#   bash scripts/install_browser.sh
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium is installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: apt-get not found; install Chromium at /usr/bin/chromium by other means" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
        echo "install_browser.sh: run as root (or install sudo) to install chromium" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-noto-cjk
echo "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
