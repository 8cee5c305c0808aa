"""A real job on a real Ray head: `ray start --head`, `ray job submit -- ftl run`, outputs checked.

The head runs isolated from the session's local runtime (`ray_runtime`): its own temp dir (so
its address file is not the one a bare `ray.init()` reads), its own free ports, its own token
passed only in the subprocess environment (never written to ~/.ray/auth_token), and it is
stopped by ending its own process session, not with `ray stop`, which would stop every Ray
process on the machine, the test session's and other users' included.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from ftl import datasets
from tests.conftest import write_workflow
from tests.support import tables
from tests.support.cluster import Head
from tests.support.sessions import session_members


@pytest.fixture
def ray_head(tmp_path):
    # Ray's unix socket paths live under the temp dir and must stay under ~107 bytes: keep it short.
    temp_dir = Path(tempfile.mkdtemp(prefix="ftlr", dir="/tmp"))
    head = Head(temp_dir, tmp_path / "head.log")
    try:
        head.wait_ready()
        assert len(session_members(head.proc.pid)) > 3  # gcs_server, raylet, dashboard, ...
        yield head
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert session_members(head.proc.pid) == [], "processes of the test head outlived its stop"
    import ray

    if ray.is_initialized():  # the session's own runtime (ray_runtime) is still there and working
        assert ray.get(ray.put("alive")) == "alive"


def test_ftl_run_as_a_ray_job(tmp_path, ray_head):
    data = tmp_path / "images"
    datasets.write_imagefolder(data, per_class=4, val_per_class=2, test_per_class=2)  # 80 real PNGs
    job_dir = tmp_path / "job"
    (job_dir / "workflows").mkdir(parents=True)
    output = tmp_path / "out" / "extract"
    write_workflow(job_dir / "workflows" / "job.yaml", name="cluster-job",
                   source={"uri": str(data)},
                   extract={"output": str(output), "backbone": "mobilenet_v2", "weights": "random",
                            "batch_size": 40},
                   train={"head": "linear", "optimizer": "lbfgs", "epochs": 2, "workers": 1},
                   tracking={"registered_model": "cluster-job", "system_metrics": False})

    # Token auth is on: the job API refuses a request without this head's token.
    assert ray_head.api("/api/jobs/", token=None)[0] == 401
    assert ray_head.api("/api/jobs/", token="0" * 64)[0] == 403

    # MLflow's embedded SQLite store keeps this test to one server (the head); the job gets its
    # tracking URI through the runtime_env, as a real submission would.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking}}
    submit = ray_head.ray("job", "submit", "--address", ray_head.dashboard, "--working-dir", ".",
                          "--submission-id", "ftl-cluster-test", "--runtime-env-json", json.dumps(runtime_env),
                          "--", "ftl", "run", "workflows/job.yaml", cwd=job_dir, timeout=900)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]

    status, body = ray_head.api("/api/jobs/ftl-cluster-test")
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body
    logs = ray_head.ray("job", "logs", "--address", ray_head.dashboard, "ftl-cluster-test", cwd=job_dir, timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert re.search(r"listed 80 = .*80 extracted \+ 0 quarantined", logs.stdout), logs.stdout[-4000:]
    assert "Connecting to existing Ray cluster" in logs.stdout  # ftl joined the head, not a local runtime
    assert re.search(r"head model:\s+models:/cluster-job-head/1", logs.stdout), logs.stdout[-4000:]

    found = sorted(output.rglob("features/_delta_log"))
    assert len(found) == 1, f"not one feature table under {output}: {found}"
    table = tables.read(found[0].parent)
    assert table.num_rows == 80
    assert len(set(table.column("image_id").to_pylist())) == 80
    assert table.column("uri").to_pylist()[0].startswith(str(data))

    from mlflow import MlflowClient

    versions = MlflowClient(tracking, registry_uri=tracking).search_model_versions("name='cluster-job-head'")
    assert [str(v.version) for v in versions] == ["1"]
