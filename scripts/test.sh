#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of the workspace
# (unit, property, the NVML stand-in, end-to-end tests with real
# processes on loopback, and deploy/ checked by the real tools: promtool,
# Prometheus, systemd-analyze, the Kubernetes schemas, headless Chromium).
# Installs what it needs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# The NVML tests build a stand-in libnvidia-ml.so from C.
if ! command -v cc >/dev/null 2>&1; then
    echo "== installing a C compiler (gcc) for the NVML stand-in library"
    apt-get update -qq && apt-get install -y -qq gcc >/dev/null
fi

# promtool, prometheus, chromium, systemd-analyze (apt),
# kubernetes-validate (PyPI, into target/deploy-venv) and schemathesis with
# openapi-spec-validator (PyPI, into target/api-venv) for
# collector/tests/it/deploy.rs, status_page.rs and openapi.rs, which fail
# rather than skip when a tool is missing while this is set; PostgreSQL
# (apt) for the PostgreSQL ledger's tests, which always fail without it.
bash scripts/install-test-tools.sh
export CAPWATCH_REQUIRE_TOOLS=1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
