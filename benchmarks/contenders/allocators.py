"""The allocator every contender process starts with: glibc tuned as ftl's actors tune it, or jemalloc.

Both go in through the environment at process start, the only way that reaches every thread
and, for ftl, every Ray worker the CLI's local runtime forks.
"""

from __future__ import annotations

import ctypes.util
import os

from ftl.pipeline import allocator

MODES = ("glibc", "jemalloc")
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# The usual recipe for PyTorch on CPUs (Intel's tuning guide): keep freed pages, purge in the background.
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000")


def find_jemalloc(given: str | None) -> str:
    """The libjemalloc.so.2 to preload; fails saying how to get one."""
    found = given or next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None) or ctypes.util.find_library("jemalloc")
    if not found or (given and not os.path.exists(given)):
        raise SystemExit(
            "jemalloc not found (looked in " + ", ".join(JEMALLOC_PATHS) + "). Install it with "
            "`apt-get install libjemalloc2` (Debian/Ubuntu; `dnf install jemalloc` on Fedora), pass its path with "
            "--jemalloc /path/to/libjemalloc.so.2, or measure glibc alone with --allocators glibc")
    return found


def env_for(mode: str, base: dict, *, jemalloc: str | None) -> dict:
    """`base` plus the allocator settings of `mode`; ftl's glibc settings in both (jemalloc ignores them)."""
    env = base | allocator.ENV
    if mode == "jemalloc":
        env |= {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
    return env
