#!/usr/bin/env bash
# Installs the real tools the deploy checks run, where they are missing:
#   promtool, prometheus   Debian package prometheus
#   chromium               Debian package chromium (status page screenshot)
#   systemd-analyze        Debian package systemd
#   kubernetes-validate    PyPI, into a virtual environment under target/
# Run by scripts/test.sh; needs root for apt-get (as CI has). Prints where
# the Python environment is.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]} (Debian packages) for the deploy checks"
    apt-get update -qq
    # Without a running init the prometheus package's service does not start.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# kubernetes-validate bundles the Kubernetes OpenAPI schemas; pinned.
venv=target/deploy-venv
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
    echo "== installing kubernetes-validate into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'kubernetes-validate==1.37.0' 'PyYAML>=6,<7'
fi
