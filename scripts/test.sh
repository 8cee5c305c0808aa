#!/usr/bin/env bash
# Set up and run the whole test suite; the tests start their own S3 (moto), MLflow and Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export AWS_EC2_METADATA_DISABLED=true
.venv/bin/python -m pytest "$@"
