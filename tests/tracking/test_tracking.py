"""Where runs go: the tracking URI's precedence and the embedded SQLite store (no server needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ftl import tracking
from ftl.config import TrackingConfig


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.uri_of(TrackingConfig()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.uri_of(TrackingConfig()) == "http://127.0.0.1:1"
    assert tracking.uri_of(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_embedded_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    saved = mlflow.get_tracking_uri()
    try:
        cfg = TrackingConfig(system_metrics=False)
        tracking.setup(cfg, "local")
        with tracking.start(cfg, name="r", stage="train") as run_id:
            tracking.log_text("hello", "note.txt")
        assert (tmp_path / "mlflow.db").exists()
        assert list(Path(tmp_path, "mlruns").rglob("note.txt"))
        assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in tracking.run_link(run_id)
        assert mlflow.get_experiment_by_name("local").artifact_location.startswith(Path(tmp_path).as_uri())
    finally:
        mlflow.set_tracking_uri(saved)


def test_a_password_in_the_tracking_uri_becomes_mlflow_credentials(monkeypatch):
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    saved = mlflow.get_tracking_uri()
    try:
        cfg = TrackingConfig(uri="https://ftl:s3cr%3At@mlflow.example:5000/base")
        assert tracking.uri_of(cfg) == "https://mlflow.example:5000/base"
        assert tracking.connect(cfg) == "https://mlflow.example:5000/base" == mlflow.get_tracking_uri()

        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ftl", "s3cr:t")
        # From the environment as well: MLflow's own threads read MLFLOW_TRACKING_URI again.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p4ss@127.0.0.1:1")
        assert tracking.connect(TrackingConfig()) == "http://127.0.0.1:1" == os.environ["MLFLOW_TRACKING_URI"]
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p4ss"
    finally:
        mlflow.set_tracking_uri(saved)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)


def test_a_run_whose_driver_died_is_ended_by_the_next_command(tmp_path, monkeypatch):
    """A driver SIGKILLed inside its run (as one cut off from MLflow ends) leaves it RUNNING; the next setup ends
    it as FAILED, and leaves alone a run whose driver still lives."""
    import signal
    import subprocess
    import sys

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    saved = mlflow.get_tracking_uri()
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"  # by its full path: MLflow keeps one store per URI string
    code = ("import os, signal, sys\nfrom ftl import tracking\nfrom ftl.config import TrackingConfig\n"
            f"cfg = TrackingConfig(uri={db!r}, system_metrics=False)\ntracking.setup(cfg, 'owners')\n"
            "with tracking.start(cfg, name=sys.argv[1], stage='train') as run_id:\n"
            "    print(run_id, flush=True)\n    sys.stdin.readline()\n")
    try:
        dead = subprocess.Popen([sys.executable, "-c", code, "dead"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        dead_run = dead.stdout.readline().strip()
        alive = subprocess.Popen([sys.executable, "-c", code, "alive"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        alive_run = alive.stdout.readline().strip()
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        mlflow.set_tracking_uri(db)
        assert mlflow.get_run(dead_run).info.status == "RUNNING"
        tracking.setup(TrackingConfig(uri=db, system_metrics=False), "owners")
        ended = mlflow.get_run(dead_run)
        assert ended.info.status == "FAILED" and "stopped without ending it" in ended.data.tags["ftl.ended_because"]
        assert mlflow.get_run(alive_run).info.status == "RUNNING"
        alive.communicate("\n", timeout=60)
        assert mlflow.get_run(alive_run).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri(saved)


def test_a_run_of_another_container_with_the_same_hostname_is_left_alone(tmp_path, monkeypatch):
    """Containers can share a hostname; a pid means something only in its own pid namespace and boot."""
    import mlflow

    from ftl.tracking import owner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    saved = mlflow.get_tracking_uri()
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        mlflow.set_tracking_uri(db)
        experiment = mlflow.MlflowClient().create_experiment("containers")
        ours_dead = {**owner.tags(), owner.PID: "4194303", owner.PID_STARTED: "1.00"}  # above any pid in use
        theirs = {**ours_dead, owner.PID_SPACE: "another-container"}
        runs = {name: mlflow.MlflowClient().create_run(experiment, tags=tags, run_name=name).info.run_id
                for name, tags in (("ours", ours_dead), ("theirs", theirs))}
        tracking.setup(TrackingConfig(uri=db, system_metrics=False), "containers")
        assert mlflow.get_run(runs["ours"]).info.status == "FAILED"
        assert mlflow.get_run(runs["theirs"]).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(saved)


def test_a_quote_in_the_output_path_neither_breaks_nor_widens_the_searches(tmp_path, fmnist, mlflow_server,
                                                                           ray_runtime, capsys):
    """The train run finds the extraction run of an output named with a quote, and only that one."""
    from mlflow import MlflowClient

    from ftl.cli import main
    from tests.conftest import write_workflow

    runs = {}
    for name in ("it's", "its"):
        wf = write_workflow(tmp_path / f"{name}.yaml", name="quoted", source={"uri": str(fmnist), "limit": 120},
                            extract={"output": str(tmp_path / name / "out"), "weights": "random", "batch_size": 32,
                                     "preprocess": {"resize": 32, "crop": 32}},
                            train={"optimizer": "lbfgs", "epochs": 3}, tracking={"registered_model": "quoted"})
        assert main(["run", str(wf)]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        runs[name] = next(l.split()[3].rstrip(":") for l in out.splitlines() if l.startswith("MLflow extraction run"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("quoted").experiment_id
    trained = client.search_runs([exp], "tags.`ftl.stage` = 'train'")
    by_output = {r.data.params["features_uri"]: r.data.tags["ftl.extraction_run"] for r in trained}
    assert {Path(u).parent.parent.name: run for u, run in by_output.items()} == runs


def test_an_mlflow_that_refuses_is_said_while_waited_for_then_named(monkeypatch, capsys):
    """A port nobody listens on: each try is on the screen, and the command stops in seconds, not minutes."""
    import time

    import mlflow

    from ftl.errors import TrackingError
    from tests.conftest import free_port

    monkeypatch.setenv("FTL_MLFLOW_WAIT_SECONDS", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    started, saved = time.monotonic(), mlflow.get_tracking_uri()
    try:
        with pytest.raises(TrackingError, match=f"MLflow at {uri} did not answer for 3s .*start the server"):
            tracking.setup(TrackingConfig(uri=uri, system_metrics=False), "refused")
    finally:
        mlflow.set_tracking_uri(saved)  # the later tests' server, not this dead port
    assert time.monotonic() - started < 30  # MLflow's own retries would take minutes
    assert "Connection refused; trying again" in capsys.readouterr().err
