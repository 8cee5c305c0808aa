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
