"""The allocator settings the backbone actors start with stop per-batch page faults."""

import os
import subprocess
import sys

from ftl.pipeline import allocator

# Allocate and free a 128 MiB tensor 40 times on a non-main thread, as a Ray actor method does,
# and count the minor page faults: each fresh page costs one.
LOOP = """
import resource, threading, torch
def work():
    for _ in range(40):
        torch.ones(32 * 2**20).sum()
t = threading.Thread(target=work)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t.start(); t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def test_actor_environment_reuses_freed_pages():
    pages = 128 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    default = page_faults({})
    tuned = page_faults(allocator.ENV)
    assert default > 30 * pages, f"the default allocator should fault each tensor in again ({default} faults)"
    # A few faults-in while the heap settles, then none: far below one per iteration.
    assert tuned < 10 * pages, f"with {allocator.ENV} freed pages should be reused ({tuned} faults)"


# A training worker's pattern under the actors' settings: buffers of growing sizes (val, a checkpoint,
# the best state's copy), each freed before the next, then the heap the process still holds.
GROWING = """
import sys, torch
from ftl.pipeline import allocator
if sys.argv[1] == "release":
    allocator.release_freed_memory()
for mib in range(16, 400, 24):
    x = torch.ones(mib * 2**18)  # mib MiB of float32
    del x
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) // 1024)
"""


def held_mib(env: dict, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", GROWING, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def test_a_training_worker_that_inherited_the_actor_settings_gives_freed_memory_back():
    kept = held_mib(allocator.ENV, "keep")
    released = held_mib(allocator.ENV, "release")
    # Under the actors' settings the one heap grows past the largest buffer (376 MiB): each larger request
    # finds no hole big enough. With glibc's defaults restored, each buffer goes back to the system when freed.
    assert kept - released > 376, (kept, released)
