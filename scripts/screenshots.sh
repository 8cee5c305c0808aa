#!/usr/bin/env bash
# Pictures of the MLflow UI for the README: the quickstart's runs, a sweep run's layer curve, the
# registered model. Runs the quickstart and the sweep first when ./mlflow.db lacks them, then serves
# that store with `mlflow server` and photographs each page with headless Chromium into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
unset MLFLOW_TRACKING_URI  # the quickstart's own store: ./mlflow.db

if ! command -v chromium >/dev/null; then
  echo "== installing Debian's chromium (headless screenshots)"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core
fi
[ -x .venv/bin/python ] || scripts/setup.sh

has() {  # has <experiment> <stage>: whether ./mlflow.db holds a finished run of that stage
  [ -f mlflow.db ] && .venv/bin/python - "$1" "$2" <<'PY'
import sys, mlflow
mlflow.set_tracking_uri("sqlite:///mlflow.db")
runs = mlflow.search_runs(experiment_names=[sys.argv[1]], filter_string=f"tags.`ftl.stage` = '{sys.argv[2]}'",
                          output_format="list")
sys.exit(0 if any(r.info.status == "FINISHED" for r in runs) else 1)
PY
}
has quickstart train || scripts/quickstart.sh
has sweep sweep || .venv/bin/ftl sweep workflows/sweep.yaml

PORT=${PORT:-5055}
.venv/bin/mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 --backend-store-uri sqlite:///mlflow.db \
  --default-artifact-root "$PWD/mlruns" >/tmp/ftl-screenshots-mlflow.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 90); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done

# The pages' addresses: ids from the store itself.
read -r QUICKSTART SWEEP_EXP SWEEP_RUN MODEL < <(.venv/bin/python - <<'PY'
import mlflow
mlflow.set_tracking_uri("sqlite:///mlflow.db")
q = mlflow.get_experiment_by_name("quickstart").experiment_id
s = mlflow.get_experiment_by_name("sweep").experiment_id
[run] = mlflow.search_runs([s], filter_string="tags.`ftl.stage` = 'sweep' and attributes.status = 'FINISHED'",
                           order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
print(q, s, run.info.run_id, "fashion-mnist-mobilenet_v2")
PY
)

shoot() {  # shoot <file> <page>: a picture of the page once its scripts have run
  # workflowType: the UI's "Model training" view, which ftl's run links open too.
  local url="http://127.0.0.1:$PORT/#/$2?workflowType=machine_learning"
  # A fresh browser profile opens MLflow's assistant panel (about 380 px on the right) on first load:
  # the window is wider by that much, and the picture is the page left of it (1410x900).
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1900,900 \
    --virtual-time-budget=20000 --screenshot="docs/$1" "$url" >/dev/null 2>&1
  # Fewer colours, same picture: each stays under 300 KB.
  .venv/bin/python -c "
import sys; from PIL import Image
im = Image.open(sys.argv[1]).convert('RGB').crop((0, 0, 1410, 900))
im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
im.save(sys.argv[1], optimize=True)" "docs/$1"
  echo "docs/$1: $url ($(du -k "docs/$1" | cut -f1) KB)"
}
mkdir -p docs
shoot mlflow-runs.png "experiments/$QUICKSTART/runs"
shoot mlflow-sweep-curve.png "experiments/$SWEEP_EXP/runs/$SWEEP_RUN/artifacts/layer_val_accuracy.png"
shoot mlflow-model.png "models/$MODEL"
