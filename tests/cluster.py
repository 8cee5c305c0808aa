"""A Ray cluster on one machine for the tests: a head, and worker nodes that see only their own disk.

Each node is a `ray start --block` in its own process session, with its own free ports and its
own token-auth environment, and is stopped by ending that session (never `ray stop`, which would
stop every Ray process on the machine). A worker node starts inside `unshare -m` with an empty
tmpfs over the paths only the driver has (its temp dir, its torch cache, its home), as on a real
cluster, where nodes share nothing but object storage and Ray's object store.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tests.conftest import free_port

BIN = Path(sys.executable).parent
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port", "node-manager-port", "object-manager-port")
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", *NODE_PORT_FLAGS)


class Head:
    """A `ray start --head --block` in its own process session, with token auth on."""

    def __init__(self, temp_dir: Path, log: Path, *, num_cpus: float = 2, resources: dict | None = None):
        self.token = secrets.token_hex(32)
        ports = {flag: free_port() for flag in PORT_FLAGS}
        self.address = f"127.0.0.1:{ports['port']}"
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        # The job's driver inherits the head's environment: PATH finds this venv's `ftl`.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
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


def end_session(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal every process of `proc`'s session (SIGKILL after 10 s); nothing else is touched."""
    sid = proc.pid
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                procs.append(p)
        except OSError:
            pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


def session_members(sid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p.pid)
        except OSError:
            pass
    return out


class Worker:
    """A worker node that joins `head` from its own mount namespace: an empty tmpfs hides each of
    `private` (the driver's temp dir, torch cache, home) from it, as another machine would."""

    def __init__(self, head: Head, log: Path, *, num_cpus: float, resources: dict, private: list[str],
                 keep: tuple[str, ...] = (), object_store_mib: int = 192):
        ports = {flag: free_port() for flag in NODE_PORT_FLAGS}
        ray_start = [str(BIN / "ray"), "start", "--address", head.address, "--block", "--num-cpus", str(num_cpus),
                     "--num-gpus", "0", "--resources", json.dumps(resources), "--disable-usage-stats",
                     "--object-store-memory", str(object_store_mib * 2**20)]
        ray_start += [arg for flag, port in ports.items() for arg in (f"--{flag}", str(port))]
        # `keep`: paths under a hidden one that every machine has (the Python install under /root):
        # bound aside, the tmpfs mounted, then moved back in.
        keep = [k for k in keep if os.path.isdir(k)]
        saved = [f"mkdir -p /run/ftl-keep{i} && mount --bind {shlex.quote(k)} /run/ftl-keep{i}" for i, k in enumerate(keep)]
        hide = [f"mount -t tmpfs -o size=256m ftl-node {shlex.quote(p)}" for p in private if os.path.isdir(p)]
        restore = [f"mkdir -p {shlex.quote(k)} && mount --move /run/ftl-keep{i} {shlex.quote(k)}" for i, k in enumerate(keep)]
        script = " && ".join([*saved, *hide, *restore, "exec " + shlex.join(ray_start)])
        self.resources, self.log = resources, log
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=head.env,
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
