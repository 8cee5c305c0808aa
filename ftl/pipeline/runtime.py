"""Connecting to Ray: the cluster of a submitted job, or a local runtime while developing."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Join the running cluster (RAY_ADDRESS, as `ray job submit` sets) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # A local runtime for one command needs no dashboard; it only slows the start.
    ray.init(include_dashboard=False, configure_logging=True, logging_level="warning")
