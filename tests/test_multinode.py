"""A multi-node Ray cluster on one machine: nodes that cannot see the driver's files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cluster import Head, Worker, wait_for_nodes

# The interpreter may live under the home that workers must not see (pyenv): every machine has it.
PYTHON_UNDER_HOME = tuple(p for p in {str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve())}
                          if p.startswith(str(Path.home()) + "/"))

PROBE = """
import json, os, sys, ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
@ray.remote(num_cpus=0, resources={sys.argv[2]: 0.01})
def look(path):
    return {"sees": os.path.exists(path), "node": ray.get_runtime_context().get_node_id()}
print(json.dumps(ray.get(look.remote(sys.argv[1]))))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """cluster.yaml in small: a head that takes no tasks, a CPU worker for decoding, a worker for the
    backbone actors (a custom `backbone` resource stands in for its GPU); workers see none of /tmp or /root."""
    logs = tmp_path_factory.mktemp("cluster")
    temp_dir = Path(tempfile.mkdtemp(prefix="ftlc", dir="/tmp"))
    head = Head(temp_dir, logs / "head.log", num_cpus=0, resources={"head": 1})
    workers = []
    try:
        head.wait_ready()
        hidden = {"private": ["/tmp", str(Path.home())], "keep": PYTHON_UNDER_HOME}
        workers = [Worker(head, logs / "cpu.log", num_cpus=1, resources={"decode": 1}, **hidden),
                   Worker(head, logs / "backbone.log", num_cpus=1, resources={"backbone": 1}, **hidden)]
        wait_for_nodes(head, 3)
        yield head, workers
    finally:
        for w in workers:
            w.stop()
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_worker_nodes_do_not_see_the_driver_s_files(cluster, tmp_path):
    head, _ = cluster
    secret = tmp_path / "driver-only.txt"
    secret.write_text("only the driver's machine has this")
    env = {**head.env, "RAY_ADDRESS": head.address}
    seen = {}
    for resource in ("decode", "backbone"):
        out = subprocess.run([sys.executable, "-c", PROBE, str(secret), resource], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        seen[resource] = json.loads(out.stdout.strip().splitlines()[-1])
    assert not seen["decode"]["sees"] and not seen["backbone"]["sees"]
    assert seen["decode"]["node"] != seen["backbone"]["node"]
