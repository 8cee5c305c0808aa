"""Quiet by default: only ftl's own lines, its progress and every error reach the screen.

Ray's start-up lines, Ray Data's per-dataset INFO lines, Ray Train's controller chatter and
MLflow's notices tell a user nothing they can act on; `-v`/`--verbose` (or FTL_VERBOSE=1, which
a Ray job's driver inherits) shows them all. Warnings and errors always pass: a level of WARNING
hides INFO only.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "FTL_VERBOSE"
CHATTY = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "filelock")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(*, be_verbose: bool) -> None:
    """Set the levels once, at the start of a command; workers read FTL_VERBOSE."""
    if be_verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Deprecations inside Ray and MLflow are theirs to fix, not the user's; ours are fixed where they arise.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(ray|mlflow|pydantic)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*An input example was not provided.*")


def ray_logging_level() -> str:
    return "info" if verbose() else "warning"


class _Drop(logging.Filter):
    """Drops the records that say only what ftl itself chose (its progress line replaces Ray Data's bars)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def quiet_ray_data() -> None:
    """Ray Data configures its own console handler (INFO) when it is imported: raise it to WARNING.

    Its file log under the Ray session keeps everything, for whoever looks.
    """
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _Drop) for f in handler.filters):
                handler.addFilter(_Drop())
