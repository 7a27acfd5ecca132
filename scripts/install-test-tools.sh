#!/usr/bin/env bash
# Installs the real tools the deploy checks run, where they are missing:
#   promtool, prometheus   Debian package prometheus
#   chromium               Debian package chromium (status page screenshot)
#   systemd-analyze        Debian package systemd
#   kubernetes-validate    PyPI, into a virtual environment under target/
#   schemathesis,          PyPI, into target/api-venv (the usage API's OpenAPI
#   openapi-spec-validator document checked and exercised against a collector)
#   initdb, pg_ctl, ...    Debian package postgresql (the ledger tests start
#                          their own server; found through pg_config --bindir,
#                          /usr/lib/postgresql/*/bin or PATH, as the tests do)
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
have_pg() {
    local d
    d=$(pg_config --bindir 2>/dev/null) && [[ -x $d/pg_ctl && -x $d/initdb ]] && return 0
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/pg_ctl && -x $d/initdb ]] && return 0
    done
    command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1
}
have_pg || missing+=(postgresql)
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

# The OpenAPI tools, apart from kubernetes-validate's (their dependencies
# differ); pinned.
api_venv=target/api-venv
if ! "$api_venv/bin/schemathesis" --version >/dev/null 2>&1 \
    || ! "$api_venv/bin/openapi-spec-validator" --help >/dev/null 2>&1; then
    echo "== installing schemathesis and openapi-spec-validator into $api_venv"
    rm -rf "$api_venv"
    python3 -m venv "$api_venv"
    "$api_venv/bin/pip" install --quiet --disable-pip-version-check \
        'schemathesis==4.32.5' 'openapi-spec-validator==0.9.0'
fi
