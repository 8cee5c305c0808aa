"""Start-up cuts keep behaviour: torchvision comes in without torch._dynamo, and dynamo still works when asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from tests.conftest import write_workflow
from tests.support import tables
from tests.support.sessions import running, session_processes

CHECK = """
import sys
import ftl.extract.embed, ftl.model.weights
assert "torch._dynamo" not in sys.modules, "torchvision pulled in torch._dynamo"
assert "torch._dynamo.utils" not in sys.modules, "the stand-in outlived torchvision's import"
import torch
import torchvision.ops
roi = sys.modules["torchvision.ops.roi_align"]  # the package exports a function of the same name
# torchvision's own reference to the function works, and loads the real dynamo when called.
assert roi.is_compile_supported("cpu") in (True, False)
assert "torch._dynamo" in sys.modules
from torch._dynamo.utils import is_compile_supported
assert roi.is_compile_supported("cpu") == is_compile_supported("cpu")
out = torch.compile(torch.nn.Linear(3, 2), backend="eager")(torch.ones(1, 3))
assert out.shape == (1, 2)
print("ok")
"""


def test_actor_imports_leave_dynamo_until_it_is_used():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_torchvision_imported_before_ftl_is_left_as_it_is():
    code = "import torchvision, sys; import ftl.model.backbones; assert 'torch._dynamo' in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def live(sid: int) -> list[str]:
    """Processes of session `sid` that still run."""
    out = []
    for p in filter(running, session_processes(sid)):
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_local_run_takes_its_ray_runtime_with_it(tmp_path, fmnist):
    """`ftl extract` starts Ray on a thread while it imports, kills that runtime at exit and skips the slow teardown:
    the features land, the summary prints, and no process of the runtime outlives the command."""
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(fmnist), "limit": 48},
                        extract={"output": str(tmp_path / "out"), "weights": "random", "batch_size": 16})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "ftl.cli", "extract", str(wf)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "listed 48 = 0 already done + 48 extracted + 0 quarantined" in out
    assert "features:" in out.splitlines()[-2]  # the summary's last lines came through whole
    assert "quarantine:" not in out  # nothing was quarantined: no path to a table without rows
    rows = tables.read(tmp_path / "out" / "features").num_rows
    assert rows == 48
    deadline = time.monotonic() + 5  # SIGKILLed processes are gone at once; reaping by init may lag a little
    while (left := live(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"outlived `ftl extract`: {left}"


def test_a_command_that_fails_while_ray_starts_exits_cleanly(tmp_path):
    """A run refused or failing right after Ray's start began (here: a source that is not there) waits
    for that start, then leaves: its error alone on stderr, its exit code, and no runtime left behind."""
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(tmp_path / "missing")},
                        extract={"output": str(tmp_path / "out"), "weights": "random"})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "ftl.cli", "extract", str(wf)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    # Exiting mid-`ray.init` used to add Ray's own errors here, or a gRPC abort in place of the exit code.
    assert err.strip().splitlines() == [f"error: source.uri {tmp_path / 'missing'} does not exist"], err[-3000:]
    deadline = time.monotonic() + 5
    while (left := live(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"outlived `ftl extract`: {left}"
