#!/usr/bin/env bash
# The GPU measurement, as one run on a machine with an NVIDIA GPU: ResNet-50 and MobileNetV2 on
# 20k generated 500x375 JPEGs, each as ftl end to end, a plain PyTorch loop and the model alone.
#
#   bash benchmarks/gpu_check.sh [images]        # from the repository root; logs go to $OUT or /tmp/ftl-gpu
#
# Needs ftl's dependencies importable (scripts/setup.sh, or wheels in .whl/ installed below) and
# Fashion-MNIST's IDX files at /usr/share/datasets/fashion-mnist or $FTL_FASHION_MNIST.
set -euo pipefail
N=${1:-20000}
LOGS=${OUT:-/tmp/ftl-gpu}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, torchvision, ray; print(torch.__version__, torchvision.__version__, ray.__version__, torch.cuda.get_device_name())" | tee -a "$LOGS/gpu.txt"
CPUS=$(nproc)
for backbone in resnet50 mobilenet_v2; do
  # Random weights: the throughput is the same as pretrained, and nothing is downloaded.
  "$PY" benchmarks/extract.py --device cuda --backbone "$backbone" --weights random --images "$N" \
    --no-warm --loader-workers "$CPUS" 2>&1 | grep -v -e "WARNING" -e "INFO" | tee "$LOGS/$backbone.txt"
done
grep -h "^summary:" "$LOGS"/*.txt
