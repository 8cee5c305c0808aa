"""A Ray cluster on one machine for the tests: a head, and worker nodes that see only their own disk.

Each node is a `ray start --block` in its own process session, with its own free ports and its
own token-auth environment, and is stopped by ending that session (never `ray stop`, which would
stop every Ray process on the machine). A worker node starts inside `unshare -m` with an empty
tmpfs over the paths only the driver has (its temp dir, its torch cache, its home), as on a real
cluster, where nodes share nothing but object storage and Ray's object store.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import psutil

from tests.conftest import free_port
from tests.support.sessions import end_session, session_processes

# What every machine of a real cluster has installed: the interpreter (pyenv keeps it under the
# home), the virtualenv and ftl itself (an editable install, so the checkout: CI may clone it under
# /tmp). Where one lies under a path a worker must not see, it is bound back in.
INSTALLED = tuple(sorted({str(Path(p).resolve()) for p in (sys.base_prefix, sys.prefix, Path(__file__).parents[2])}))


def installed_under(hidden: list[str]) -> tuple[str, ...]:
    return tuple(p for p in INSTALLED if any(p.startswith(str(Path(h).resolve()) + "/") for h in hidden))

BIN = Path(sys.executable).parent
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port", "node-manager-port", "object-manager-port")
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", *NODE_PORT_FLAGS)


class Head:
    """A `ray start --head --block` in its own process session, with token auth on."""

    def __init__(self, temp_dir: Path, log: Path, *, num_cpus: float = 2, resources: dict | None = None,
                 env: dict | None = None):
        self.token = secrets.token_hex(32)
        ports = {flag: free_port() for flag in PORT_FLAGS}
        self.address = f"127.0.0.1:{ports['port']}"
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        # The job's driver inherits the head's environment: PATH finds this venv's `ftl`.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(env or {})
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--resources", json.dumps(resources or {}),
               "--temp-dir", str(temp_dir), "--disable-usage-stats", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--object-store-memory", str(256 * 2**20)]
        cmd += [arg for flag, port in ports.items() for arg in (f"--{flag}", str(port))]
        self.log = log
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def api(self, path: str, *, token: str | None = "own") -> tuple[int, str]:
        """GET a dashboard endpoint, with this head's bearer token unless told otherwise."""
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.api("/api/jobs/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the head's job server did not come up:\n{self.log.read_text()[-3000:]}")

    def ray(self, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        """Ray's own CLI against this head."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        """End every process of this head's session; nothing else on the machine is touched."""
        end_session(self.proc)


class Worker:
    """A worker node that joins `head` from its own mount namespace: an empty tmpfs hides each of
    `private` (the driver's temp dir, torch cache, home) from it, as another machine would."""

    def __init__(self, head: Head, log: Path, *, num_cpus: float, resources: dict, private: list[str],
                 env: dict | None = None, keep: tuple[str, ...] = (), object_store_mib: int = 192):
        ports = {flag: free_port() for flag in NODE_PORT_FLAGS}
        ray_start = [str(BIN / "ray"), "start", "--address", head.address, "--block", "--num-cpus", str(num_cpus),
                     "--num-gpus", "0", "--resources", json.dumps(resources), "--disable-usage-stats",
                     "--object-store-memory", str(object_store_mib * 2**20)]
        ray_start += [arg for flag, port in ports.items() for arg in (f"--{flag}", str(port))]
        # `keep`: paths under a hidden one that every machine has (the Python install under /root):
        # bound aside, the tmpfs mounted, then moved back in.
        keep = [k for k in keep if os.path.isdir(k)]
        saved = [f"mkdir -p /run/ftl-keep{i} && mount --bind {shlex.quote(k)} /run/ftl-keep{i}" for i, k in enumerate(keep)]
        # A hidden path inside a kept one (a package in the virtualenv) is hidden once that is back.
        inside = [p for p in private if any(p.startswith(k + "/") for k in keep)]
        hide = [f"mount -t tmpfs -o size=256m ftl-node {shlex.quote(p)}" for p in private
                if os.path.isdir(p) and p not in inside]
        restore = [f"mkdir -p {shlex.quote(k)} && mount --move /run/ftl-keep{i} {shlex.quote(k)}" for i, k in enumerate(keep)]
        hide_inside = [f"mount -t tmpfs -o size=256m ftl-node {shlex.quote(p)}" for p in inside if os.path.isdir(p)]
        script = " && ".join([*saved, *hide, *restore, *hide_inside, "exec " + shlex.join(ray_start)])
        self.resources, self.log = resources, log
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     env={**head.env, **(env or {})},
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGKILL stands for a machine that is gone; SIGTERM for a node taken down."""
        end_session(self.proc, sig)


def wait_for_nodes(head: Head, count: int, timeout: float = 120) -> None:
    """Until the head reports `count` alive nodes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, body = head.api("/nodes?view=summary")
        if status == 200:
            nodes = json.loads(body)["data"]["summary"]
            if sum(1 for n in nodes if n["raylet"]["state"] == "ALIVE") >= count:
                return
        time.sleep(1)
    raise RuntimeError(f"the cluster did not reach {count} alive nodes in {timeout:.0f}s")


class Cluster:
    """cluster.yaml in small: a head that takes no tasks, a CPU worker for decoding (resource `decode`) and a
    worker for the backbone actors (resource `backbone`, standing in for its GPU); workers see none of `hide`."""

    # The decode node holds reader tasks (0.5 CPU each) and write tasks (1 CPU) side by side, as
    # cluster.yaml's 16-core cpu_decode nodes do; the backbone node's CPU is its actor's.
    CPUS: ClassVar[dict[str, int]] = {"decode": 2, "backbone": 1}

    def __init__(self, logs: Path, *, hide: list[str], head_env: dict | None = None, worker_env: dict | None = None):
        self.logs, self.hide, self.count, self.worker_env = logs, hide, 0, worker_env or {}
        # Ray's unix socket paths live under the temp dir and must stay under ~107 bytes: keep it short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ftlc", dir="/tmp"))
        # The test machine is shared: Ray's memory monitor, which judges the whole machine, would kill
        # this cluster's workers for what other processes use.
        self.head = Head(self.temp_dir, logs / "head.log", num_cpus=0, resources={"head": 1},
                         env={"RAY_memory_monitor_refresh_ms": "0", **(head_env or {})})
        self.workers: dict[str, Worker] = {}

    def start(self) -> Cluster:
        self.head.wait_ready()
        for kind in ("decode", "backbone"):
            self.add(kind)
        try:  # a loaded machine starts a node in tens of seconds
            wait_for_nodes(self.head, 3, timeout=300)
        except RuntimeError as e:
            tails = "".join(f"\n--- {w.log.name}:\n{w.log.read_text()[-2000:]}" for w in self.workers.values())
            raise RuntimeError(f"{e}{tails}") from None
        return self

    def add(self, kind: str) -> Worker:
        """A (new) worker node of `kind`, e.g. a spot GPU node replacing one that was lost."""
        self.count += 1
        self.workers[kind] = Worker(self.head, self.logs / f"{kind}-{self.count}.log", num_cpus=self.CPUS[kind],
                                    resources={kind: 1}, private=self.hide, keep=installed_under(self.hide),
                                    env=self.worker_env)
        return self.workers[kind]

    def stop(self) -> None:
        print(f"\ncluster CPU time: {self.cpu_seconds():.0f} s (all nodes, finished processes included)")
        for w in self.workers.values():
            w.stop()
        self.head.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU the live nodes' processes and the ones they reaped used: what a quiet machine's wall time follows."""
        total = 0.0
        for proc in [self.head.proc, *(w.proc for w in self.workers.values())]:
            for p in session_processes(proc.pid):
                try:
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass
        return total

    def submit(self, job_dir: Path, entrypoint: str, *, job_id: str, env: dict | None = None) -> None:
        """`ray job submit --no-wait` of `entrypoint`, shipping `job_dir`, as a user does."""
        runtime_env = {"env_vars": env or {}}
        # The CLI quotes each argument after `--`: a chain of commands goes through one shell.
        args = ["sh", "-c", entrypoint] if "&&" in entrypoint else shlex.split(entrypoint)
        out = self.head.ray("job", "submit", "--address", self.head.dashboard, "--working-dir", ".",
                            "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
                            "--", *args, cwd=job_dir, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def job(self, job_id: str) -> dict:
        status, body = self.head.api(f"/api/jobs/{job_id}")
        assert status == 200, body
        return json.loads(body)

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        """The job's record once it ended (SUCCEEDED, FAILED or STOPPED)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} still {info['status']} after {timeout:.0f}s:\n"
                             f"{self.logs_of(job_id)[-4000:]}")

    def logs_of(self, job_id: str) -> str:
        status, body = self.head.api(f"/api/jobs/{job_id}/logs")
        return json.loads(body)["logs"] if status == 200 else body

    def run(self, job_dir: Path, entrypoint: str, *, job_id: str, env: dict | None = None,
            timeout: float = 300) -> tuple[dict, str]:
        """Submit, wait, and return the job's record and its logs."""
        self.submit(job_dir, entrypoint, job_id=job_id, env=env)
        info = self.wait(job_id, timeout)
        return info, self.logs_of(job_id)

    def node_of(self, kind: str) -> str:
        """The node id of the live worker of `kind`."""
        _, body = self.head.api("/nodes?view=summary")
        for n in json.loads(body)["data"]["summary"]:
            if n["raylet"]["state"] == "ALIVE" and kind in n["raylet"].get("resourcesTotal", {}):
                return n["raylet"]["nodeId"]
        raise AssertionError(f"no live node with resource {kind}")

    def log_dirs(self) -> list[Path]:
        """Every live node's Ray logs; a worker's through its own view of the disk (/proc/<pid>/root)."""
        dirs = [self.temp_dir / "session_latest" / "logs"]
        # Workers write under the head's temp dir path too, in their own /tmp.
        dirs += [Path(f"/proc/{w.proc.pid}/root{self.temp_dir}/session_latest/logs") for w in self.workers.values()
                 if w.proc.poll() is None]
        return dirs

    def actors(self, class_part: str) -> list[dict]:
        """The actors (alive or dead) this cluster ran whose class name contains `class_part`."""
        status, body = self.head.api("/api/v0/actors?limit=10000&detail=true")
        assert status == 200, body
        return [a for a in json.loads(body)["data"]["result"]["result"] if class_part in a["class_name"]]

    def tasks(self, name: str) -> list[dict]:
        """The attempts of the tasks named `name` this cluster ran, each with its node."""
        status, body = self.head.api(f"/api/v0/tasks?limit=10000&detail=true&filter_keys=name&filter_predicates=%3D"
                                     f"&filter_values={name}")
        assert status == 200, body
        return json.loads(body)["data"]["result"]["result"]


def job_dir(root: Path, **workflows: dict) -> Path:
    """A folder to ship with `ray job submit --working-dir`, holding workflows/<name>.yaml."""
    import yaml

    (root / "workflows").mkdir(parents=True, exist_ok=True)
    for name, wf in workflows.items():
        (root / "workflows" / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **wf}))
    return root


@contextlib.contextmanager
def running_cluster(logs: Path, *, hide: list[str], head_env: dict | None = None, worker_env: dict | None = None):
    """A started Cluster, stopped (every process of its sessions) on the way out."""
    cluster = Cluster(logs, hide=hide, head_env=head_env, worker_env=worker_env)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
