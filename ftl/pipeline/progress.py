"""Live progress of a run: images done of those to do, images/s, ETA, failures so far (or, for
training, epochs: ftl.fitting.live).

The workers add their counts to a small Ray actor (`Counter`, fire and forget); the driver polls
it. In a terminal, one line updates in place (rich); anywhere else (Ray job logs, cron), a plain
line is printed at most every `LOG_EVERY` seconds, and once more at the end, so that a long
nightly run shows it is alive without burying its log.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# Seconds between plain lines when the output is not a terminal; FTL_PROGRESS_SECONDS overrides.
LOG_EVERY = float(os.environ.get("FTL_PROGRESS_SECONDS", "10"))
POLL = 0.5


class Counter:
    """Ray actor: the running totals of one run."""

    def __init__(self):
        self.totals = {"ok": 0, "failed": 0, "done": 0}

    def add(self, ok: int, failed: int, done: int) -> None:
        self.totals["ok"] += ok
        self.totals["failed"] += failed
        self.totals["done"] += done

    def snapshot(self) -> dict:
        return dict(self.totals)


def line(stage: str, counts: dict, total: int | None, seconds: float) -> str:
    """`extract: 1,200/3,000 images (40%), 85.3 images/s, ETA 21s, 3 failed`."""
    worked = counts["ok"] + counts["failed"]
    rate = worked / seconds if seconds > 0 else 0.0
    of = f"/{total:,}" if total else ""
    share = f" ({100 * worked / total:.0f}%)" if total else ""
    eta = f", ETA {fmt_seconds((total - worked) / rate)}" if total and rate > 0 and worked < total else ""
    done = f", {counts['done']:,} already done" if counts["done"] else ""
    return f"{stage}: {worked:,}{of} images{share}, {rate:.1f} images/s{eta}, {counts['failed']:,} failed{done}"


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Shows a run's progress while the block runs; `handle` goes to the actors."""

    def __init__(self, stage: str, *, total: int | None, stream=None, interactive: bool | None = None,
                 counter: type = Counter, render=line, remote: bool = True):
        self.stage, self.total, self.render, self.remote = stage, total, render, remote
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        if remote:  # workers in other processes (Ray Data actors, Ray Train workers) report to it
            import ray

            self.handle = ray.remote(num_cpus=0)(counter).remote()
        else:  # the work runs in this process: a plain object will do
            self.handle = counter()
        self.stop = threading.Event()
        self.started = time.perf_counter()

    def __enter__(self) -> Progress:
        self.thread = threading.Thread(target=self._show, name="ftl-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        if kind is None and not self.interactive:  # a log ends on where the run got to
            try:
                self._print(self.counts())
            except Exception:  # progress is a courtesy: a lost poll loses only that line
                pass

    def counts(self) -> dict:
        if not self.remote:
            return self.handle.snapshot()
        import ray

        return ray.get(self.handle.snapshot.remote(), timeout=10)

    def _show(self) -> None:
        if self.interactive:
            self._live()
        else:
            self._plain()

    def _plain(self) -> None:
        while not self.stop.wait(LOG_EVERY):
            try:
                self._print(self.counts())
            except Exception:  # a lost poll only skips a line
                continue

    def _print(self, counts: dict) -> None:
        print(self.text(counts), file=self.stream, flush=True)

    def text(self, counts: dict) -> str:
        return self.render(self.stage, counts, self.total, time.perf_counter() - self.started)

    def _live(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(file=self.stream, highlight=False)
        with Live("", console=console, refresh_per_second=4, transient=True) as live:
            while not self.stop.wait(POLL):
                try:
                    live.update(Text(self.text(self.counts())))
                except Exception:  # a lost poll only skips a frame
                    continue


def report(handle, *, ok: int, failed: int, done: int) -> None:
    """From an actor: add one batch's counts; never waits, never fails the batch."""
    if handle is not None:
        try:
            handle.add.remote(ok, failed, done)
        except Exception:  # progress is a courtesy: the run goes on without it
            pass


def tell(handle, **state) -> None:
    """From a worker or the driver: where a run is now (`counter.update`); never waits, never fails the run."""
    if handle is None:
        return
    try:
        update = handle.update
        (update.remote if hasattr(update, "remote") else update)(**state)
    except Exception:  # progress is a courtesy: the run goes on without it
        pass
