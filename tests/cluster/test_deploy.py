"""Scheduled reprocessing: the deploy/ recipes parse, run `ray job submit -- ftl run` on a valid
schedule without overlap, and the reprocess workflow they name is a valid S3-to-S3 workflow."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from ftl import config

ROOT = Path(__file__).resolve().parents[2]
FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]
NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def cron_errors(schedule: str) -> list[str]:
    """What is wrong with a 5-field cron schedule (empty when it is valid)."""
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{len(fields)} fields, not 5: {schedule!r}"]
    errors = []
    for i, (field, (what, lo, hi)) in enumerate(zip(fields, FIELDS)):
        for part in field.split(","):
            rng, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                errors.append(f"{what}: bad step in {part!r}")
            if rng == "*":
                continue
            for bound in rng.split("-", 1):
                value = NAMES[i].index(bound.lower()) + (i == 3) if bound.lower() in NAMES.get(i, []) else bound
                if not str(value).isdigit() or not lo <= int(value) <= hi:
                    errors.append(f"{what}: {bound!r} is not in {lo}-{hi}")
    return errors


def test_cron_check_can_fail():
    assert cron_errors("0 2 * * *") == []
    assert cron_errors("*/15 1-5 1,15 jan-mar mon-fri") == []
    assert cron_errors("0 2 * *")
    assert cron_errors("0 25 * * *")
    assert cron_errors("61 2 * * *")
    assert cron_errors("0 2 * * 8")


def submit_args(argv: list[str]) -> list[str]:
    """The entrypoint after `--` of a `ray job submit` command line, checked on the way."""
    assert argv[:3] == ["ray", "job", "submit"], argv
    assert "--address" in argv and "--working-dir" in argv, argv
    return argv[argv.index("--") + 1:]


@pytest.fixture(scope="module")
def cronjob() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "cronjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "CronJob"]
    assert len(jobs) == 1
    return jobs[0]


def test_kubernetes_cronjob(cronjob):
    assert cronjob["apiVersion"] == "batch/v1"
    spec = cronjob["spec"]
    assert cron_errors(spec["schedule"]) == []
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    entry = submit_args(container["command"] + container.get("args", []))
    assert entry[:2] == ["ftl", "run"]
    assert (ROOT / entry[2]).is_file(), f"{entry[2]} is not in the repository"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "the token must come from a Secret"
    address = container["command"][container["command"].index("--address") + 1]
    assert re.fullmatch(r"http://[a-z0-9.-]+-head-svc(\.[a-z0-9.-]+)?:8265", address), address


def test_head_node_crontab():
    lines = [ln for ln in (ROOT / "deploy" / "crontab").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert cron_errors(" ".join(fields[:5])) == []
    argv = shlex.split(fields[5])
    assert argv[:3] == ["flock", "-n", argv[2]], "no overlap: flock -n"
    inner = shlex.split(argv[argv.index("-lc") + 1])
    entry = submit_args(inner[inner.index("ray"):])
    assert entry[:2] == ["ftl", "run"] and (ROOT / entry[2]).is_file()


def test_dockerfile_uses_the_pinned_ray_image():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    ray_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                   if d.startswith("ray[")).split("==")[1]
    bases = re.findall(r"rayproject/ray:([\d.]+)-py\d+-\w+", text)
    assert bases and set(bases) == {ray_pin}
    assert re.search(r"^RUN pip install .*\s\.$", text, re.M), "the image installs ftl with its pins"


def test_reprocess_workflow_is_valid_and_s3_to_s3():
    wf = config.load_workflow(ROOT / "workflows" / "reprocess.yaml")
    assert wf.source.uri.startswith("s3://") and wf.extract.output.startswith("s3://")
    assert wf.extract.weights not in ("random",), "a fixed, real feature set every night"
    assert wf.source.limit is None
    assert not wf.storage.options, "credentials come from the instance profile, not the workflow"
