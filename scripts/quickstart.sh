#!/usr/bin/env bash
# Set up, build a real Fashion-MNIST imagefolder, and run workflows/quickstart.yaml: extract, train, register.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -d data/fashion-mnist ] || .venv/bin/python -m ftl.datasets data/fashion-mnist --per-class 200
.venv/bin/ftl run workflows/quickstart.yaml "$@"
