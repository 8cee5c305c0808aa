"""cluster.yaml passes Ray's own validation and keeps the cluster closed, bounded and pinned."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
OPEN_RANGES = ("0.0.0.0/0", "::/0")


def strings(node):
    """Every string in a nested YAML value, keys included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict:
    """The config as `ray up` sees it: merged with the AWS defaults, then validated (offline)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.split("#")[0].strip())
        assert m, f"pyproject.toml dependency not pinned exactly: {dep}"
        out[m.group(1).lower()] = m.group(3)
    return out


def test_ray_validation_accepts_it_and_rejects_a_broken_copy(raw, config):
    assert config["provider"]["type"] == "aws"
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["node_cofnig"] = broken["available_node_types"]["gpu_spot"].pop(
        "node_config")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(broken)


def test_nothing_is_open_to_the_world(raw, config):
    for text in strings(config):
        for cidr in OPEN_RANGES:
            assert cidr not in text, f"open ingress range {cidr} in cluster.yaml: {text!r}"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                 [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not set(ranges) & set(OPEN_RANGES), rule
    # A node type without its own group gets the launcher's default one, which always allows
    # SSH from 0.0.0.0/0: every node type must name its group.
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: no SecurityGroupIds"
    for cmd in config["head_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd, cmd
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    for cmd in config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_object_storage_through_instance_profiles_not_keys(raw):
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no IamInstanceProfile"
        assert node_type["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    for key in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert key not in text.lower()


def test_cpu_and_spot_gpu_worker_types_with_bounds(config):
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {k: v for k, v in types.items() if k != head}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU")}
    assert types[head]["resources"].get("GPU", 0) == 0
    assert cpu and gpu
    for name, t in gpu.items():
        assert re.match(r"g[56]\.", t["node_config"]["InstanceType"]), name
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert "gpu" in t.get("docker", {}).get("worker_image", ""), f"{name}: needs a CUDA image"
    assert isinstance(config["max_workers"], int) and 0 < config["max_workers"] <= 100
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_nodes_install_ftl_with_the_pyproject_pins(config):
    want = pins()
    images = [config["docker"]["image"], config["docker"]["head_image"], config["docker"]["worker_image"]]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if t.get("docker", {}).get("worker_image")]
    for image in images:
        m = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-(cpu|gpu|cu\d+)", image)
        assert m, image
        assert m.group(1) == want["ray"], f"{image}: the Ray pin is {want['ray']}"
    commands = " ".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    assert re.search(r"pip install .*~/ftl\b", commands), "setup must install ftl (and so its pins)"
    assert config["file_mounts"]["~/ftl"] == "."
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.]+)", commands):
        assert want.get(name.lower()) == version, f"{name}=={version} differs from pyproject.toml"


# What each node does on S3 (see the statements' comments in cluster.yaml), as IAM sees it.
S3_OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
IMAGE, PART, LEASE = ("arn:aws:s3:::example-images/catalog/train/cat/1.jpg",
                      "arn:aws:s3:::example-features/catalog/resnet50/features/part-1.parquet",
                      "arn:aws:s3:::example-features/catalog/resnet50/_ftl.lease")
WEIGHTS, OTHER = "arn:aws:s3:::example-models/weights/r50.safetensors", "arn:aws:s3:::example-features/other/x"


@pytest.fixture(scope="module")
def iam(raw) -> dict:
    return raw["metadata"]["iam"]


def test_every_instance_profile_has_its_policy_and_says_why(raw, iam):
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in raw["available_node_types"].values()}
    assert profiles == set(iam)
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    sids = [i for i, line in enumerate(lines) if line.strip().startswith("- Sid:")]
    assert len(sids) == sum(len(p["Statement"]) for p in iam.values())
    for i in sids:  # each statement comes with its reason
        assert lines[i - 1].strip().startswith("#"), lines[i]


def test_nothing_broad(iam):
    for name, policy in iam.items():
        for st in policy["Statement"]:
            assert set(st) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, st  # no NotAction/NotResource
            actions, resources = st["Action"], st["Resource"]
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, st["Sid"])
            if "*" in resources:
                assert all(a.startswith("ec2:Describe") for a in actions), (name, st["Sid"])
            for r in resources:  # S3 grants name a prefix of a bucket, never a whole bucket's objects
                if r.startswith("arn:aws:s3:::") and "/" in r:
                    assert r.split("/", 1)[1] not in ("", "*"), (name, st["Sid"], r)
            s3 = {a for a in actions if a.startswith("s3:")}
            assert s3 <= S3_OBJECT_ACTIONS | {"s3:ListBucket", "s3:GetBucketLocation"}, (name, st["Sid"])
            if "s3:ListBucket" in s3 and st["Effect"] == "Allow":
                assert st["Condition"]["StringLike"]["s3:prefix"], (name, st["Sid"])  # a prefix, not the bucket
    worker = [a for st in iam["ftl-ray-worker"]["Statement"] for a in st["Action"]]
    assert all(a.startswith("s3:") for a in worker), "workers launch nothing and pass no role"


def test_each_node_may_do_what_ftl_does_there_and_no_more(iam):
    from tests.support.iam import allowed

    worker, head = iam["ftl-ray-worker"], iam["ftl-ray-head"]
    # Workers: read images; stage, copy-rename and delete parts; read the lease (the fence).
    assert allowed(worker, "s3:GetObject", IMAGE, {})
    for action in S3_OBJECT_ACTIONS:
        assert allowed(worker, action, PART, {}), action
    assert allowed(worker, "s3:GetObject", LEASE, {})
    assert allowed(worker, "s3:ListBucket", "arn:aws:s3:::example-features", {"s3:prefix": "catalog/resnet50/"})
    # ... but never take or drop a lease, write images, read weights (they come through Ray) or leave the prefix.
    assert not allowed(worker, "s3:PutObject", LEASE, {"s3:if-none-match": "*"})
    assert not allowed(worker, "s3:DeleteObject", LEASE, {})
    assert not allowed(worker, "s3:PutObject", IMAGE, {})
    assert not allowed(worker, "s3:GetObject", WEIGHTS, {})
    assert not allowed(worker, "s3:PutObject", OTHER, {})
    assert not allowed(worker, "s3:ListBucket", "arn:aws:s3:::example-features", {"s3:prefix": "other/"})
    assert not allowed(worker, "s3:ListBucket", "arn:aws:s3:::example-features", {})
    # The head: the lease only by conditional writes (create if absent, replace if unchanged), then released.
    assert allowed(head, "s3:PutObject", LEASE, {"s3:if-none-match": "*"})
    assert allowed(head, "s3:PutObject", LEASE, {"s3:if-match": '"etag"'})
    assert not allowed(head, "s3:PutObject", LEASE, {})
    assert allowed(head, "s3:DeleteObject", LEASE, {})
    assert allowed(head, "s3:PutObject", PART, {}) and allowed(head, "s3:GetObject", WEIGHTS, {})
    assert allowed(head, "s3:ListBucket", "arn:aws:s3:::example-images", {"s3:prefix": "catalog/"})
    assert not allowed(head, "s3:PutObject", IMAGE, {}) and not allowed(head, "s3:PutObject", WEIGHTS, {})
    assert not allowed(head, "s3:GetObject", OTHER, {})
