"""Offline checks of the deployment files in cluster/.

Nothing here starts a cluster: the YAMLs are validated with the validators Ray itself runs before it talks
to a cloud (`ray up` calls prepare_config and validate_config; `ray job submit` reads a runtime_env file
with parse_runtime_env_args and builds a RuntimeEnv), plus structural checks of the KubeRay RayJob, a
version-drift check of every pin, a secret scan, and a heuristic "every key has a comment" check.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "gpu-cluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
YAML_FILES = (LAUNCHER, RAYJOB, RUNTIME_ENV)

# rayproject/ray tags: {Ray version}[-{Python}][-{platform}] (Ray docs, "Docker Source Images").
IMAGE_RE = re.compile(r"\brayproject/ray:(?P<version>\d+\.\d+\.\d+)(?:-(?P<python>py\d+))?(?:-(?P<platform>gpu|cpu|cu\d+))?\b")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob document in {RAYJOB.name}, found {len(jobs)}"
    return jobs[0]


def _pinned_image() -> re.Match:
    """The single source of truth for the pins: the launcher's docker image."""
    match = IMAGE_RE.fullmatch(_load(LAUNCHER)["docker"]["image"])
    assert match, "docker.image must be a pinned rayproject/ray:<x.y.z>-pyXY-gpu tag"
    return match


PINNED = _pinned_image()
PINNED_RAY = PINNED["version"]


# --- every file parses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_rayjob_runtime_env_yaml_parses() -> None:
    assert isinstance(yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"]), dict)


# --- versions: one pin everywhere, equal to the installed ray ------------------------------------------------


def test_pinned_ray_equals_installed_ray() -> None:
    assert PINNED_RAY == ray.__version__, (
        f"cluster/ pins Ray {PINNED_RAY} but this environment has ray {ray.__version__}: bump the image tags,"
        " rayVersion and the ray pin in setup_commands together with the project's ray")


def test_every_image_tag_agrees() -> None:
    for path in YAML_FILES:
        for match in IMAGE_RE.finditer(path.read_text()):
            assert match.group(0) == PINNED.group(0), f"{path.name}: {match.group(0)} != {PINNED.group(0)}"
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    containers = [c for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]
    assert containers and all(c["image"] == PINNED.group(0) for c in containers)


def test_image_is_pinned_python_gpu_build() -> None:
    assert PINNED["python"] and PINNED["platform"] == "gpu", "pin the Python version and use the GPU image"


def test_rayjob_ray_version_matches_image() -> None:
    assert _rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == PINNED_RAY


def test_setup_commands_pin_ray_and_torch() -> None:
    setup = " ".join(_load(LAUNCHER)["setup_commands"])
    assert f'"ray[default]=={PINNED_RAY}"' in setup
    torch_pins = set(re.findall(r"torch==([\w.+]+)", setup))
    job_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    torch_pins |= {p.split("==", 1)[1] for p in job_env["pip"]["packages"] if p.startswith("torch==")}
    assert len(torch_pins) == 1, f"torch pinned differently across cluster/: {torch_pins}"


# --- the cluster launcher YAML -------------------------------------------------------------------------------


def test_launcher_matches_ray_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray itself
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(_load(LAUNCHER), json.loads(schema_path.read_text()))


def test_launcher_passes_ray_up_validation() -> None:
    """What `ray up` does with the file before it contacts AWS: merge the AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_load(LAUNCHER))))


def test_launcher_node_types() -> None:
    config = _load(LAUNCHER)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert workers, "a separate worker node type is required"
    for name, worker in workers.items():
        assert worker["resources"].get("GPU", 0) >= 1, f"{name} declares no GPU"
        assert 0 <= worker.get("min_workers", 0) <= worker["max_workers"] <= config["max_workers"]
    image_ids = {t["node_config"]["ImageId"] for t in types.values()}
    assert len(image_ids) == 1, "head and workers must boot the same AMI"
    assert config["idle_timeout_minutes"] > 0


def test_launcher_node_configs_are_valid_ec2_arguments() -> None:
    """Runs where botocore is installed (it is not a test dependency): node_config vs. RunInstances."""
    session_mod = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    operation = session_mod.get_session().get_service_model("ec2").operation_model("RunInstances")
    for name, node_type in _load(LAUNCHER)["available_node_types"].items():
        report = ParamValidator().validate({**node_type["node_config"], "MinCount": 1, "MaxCount": 1},
                                           operation.input_shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_launcher_commands_are_valid_bash() -> None:
    config = _load(LAUNCHER)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in config.get(key) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr}"


def test_launcher_env_matches_runtime_env() -> None:
    """`hf download` through `ray exec` must fill the cache the job reads."""
    options = _load(LAUNCHER)["docker"]["run_options"]
    node_env = dict(opt[3:].split("=", 1) for opt in options if opt.startswith("-e "))
    job_env = _load(RUNTIME_ENV)["env_vars"]
    for name in ("HF_HOME", "HF_HUB_CACHE", "LORASCALE_CACHE_DIR"):
        assert node_env[name] == job_env[name], name
    mounts = [opt.split()[1].split(":")[1] for opt in options if opt.startswith("-v ")]
    assert any(job_env["HF_HUB_CACHE"].startswith(m.rstrip("/") + "/") for m in mounts), \
        "the hub cache must be on a host bind mount so it survives container restarts"


def test_launcher_installs_this_checkout() -> None:
    config = _load(LAUNCHER)
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    assert any(remote in cmd for cmd in config["setup_commands"]), "setup_commands must pip install the checkout"


# --- the runtime_env file for `ray job submit` ---------------------------------------------------------------


def _submitted_runtime_env(working_dir: str = ".") -> dict:
    """Exactly what `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` builds."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=working_dir)


def test_runtime_env_keys_are_ray_fields() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load(RUNTIME_ENV)
    # RuntimeEnv(**env) alone would accept a misspelt key as a plugin name; require known fields.
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    assert "working_dir" not in env, "`--working-dir .` supplies it (and would override it)"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"


def test_runtime_env_builds_with_working_dir() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _submitted_runtime_env()
    assert env["working_dir"] == "."
    built = RuntimeEnv(**env)
    assert built["env_vars"]["HF_HUB_CACHE"] == _load(RUNTIME_ENV)["env_vars"]["HF_HUB_CACHE"]


def test_rayjob_runtime_env_is_valid() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)
    assert any(p.startswith("lorascale") for p in env["pip"]["packages"]), "the job must install lorascale"
    launcher_env = _load(RUNTIME_ENV)["env_vars"]
    assert {k: env["env_vars"][k] for k in launcher_env} == launcher_env, "same env_vars as runtime_env.yaml"


def test_working_dir_package_excludes(tmp_path: Path) -> None:
    """Zip a miniature repo the way Ray packages working_dir; results, .git and weights stay out."""
    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    files = ["lorascale/__init__.py", "lorascale/cli/__init__.py", "pyproject.toml", ".git/HEAD",
             "results/matrices/part-0.parquet", "benchmarks/out/x.json", "tests/test_x.py",
             "local/model.safetensors", "lorascale/__pycache__/cli.cpython-311.pyc"]
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    package = tmp_path / "pkg.zip"
    create_package(str(repo), package, include_gitignore=True, excludes=_submitted_runtime_env()["excludes"])
    names = set(zipfile.ZipFile(package).namelist())
    assert {"lorascale/__init__.py", "lorascale/cli/__init__.py", "pyproject.toml"} <= names
    leaked = [n for n in names if n.startswith((".git/", "results/", "benchmarks/out/", "tests/"))
              or n.endswith((".safetensors", ".pyc"))]
    assert not leaked, leaked


def test_this_checkout_uploads_under_ray_limit(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=_submitted_runtime_env()["excludes"])
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE // 10, "working_dir upload is unexpectedly large"
    assert "lorascale/cli/__init__.py" in zipfile.ZipFile(package).namelist()


# --- the KubeRay RayJob ------------------------------------------------------------------------------------


def test_rayjob_structure() -> None:
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["lorascale", "run"]
    for option in ("--base", "--tuned", "--out", "--ray-address"):
        assert option in argv, option
    assert argv[argv.index("--out") + 1].startswith("/results/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0  # KubeRay honours it only with shutdownAfterJobFinishes
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{group['groupName']} requests no GPU"
            gpus += int(limits["nvidia.com/gpu"]) * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else gpus
    assert workers == gpus, f"--workers {workers} but the worker groups provide {gpus} GPUs"


def test_rayjob_volumes_hold_cache_and_results() -> None:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])["env_vars"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
        claim_mounts = [m["mountPath"] for m in mounted
                        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") in claims]
        assert any(env["HF_HUB_CACHE"].startswith(p.rstrip("/") + "/") for p in claim_mounts)
    head_mounts = [m["mountPath"] for c in pods[0]["containers"] for m in c["volumeMounts"]]
    assert "/results" in head_mounts


# --- secrets -----------------------------------------------------------------------------------------------

TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
SECRET_KEY_RE = re.compile(r"^\s*-?\s*(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)\s*:",
                           re.MULTILINE)


@pytest.mark.parametrize("path", [*YAML_FILES, CLUSTER / "README.md"], ids=lambda p: p.name)
def test_no_secrets(path: Path) -> None:
    text = path.read_text()
    assert not TOKEN_RE.search(text), f"{path.name} contains something shaped like a Hugging Face token"
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{path.name} contains an AWS access key id"
    if path.suffix == ".yaml":
        assert not SECRET_KEY_RE.search(text), f"{path.name} sets a credential variable literally"


def test_token_only_from_secret_in_rayjob() -> None:
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            for var in container.get("env", []):
                if "TOKEN" in var["name"]:
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]
    assert "HF_TOKEN" not in yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"]).get("env_vars", {})


# --- every key commented -----------------------------------------------------------------------------------

KEY_LINE = re.compile(r"""^(?P<indent>\s*)(?:-\s+)?(?:"[^"]*"|'[^']*'|[A-Za-z0-9_.~/-]+)\s*:(?:\s|$)""")
BLOCK_SCALAR = re.compile(r":\s*[|>][-+]?\s*(?:#.*)?$")


def _has_comment(line: str) -> bool:
    unquoted = re.sub(r""""[^"]*"|'[^']*'""", '""', line)
    return bool(re.search(r"(^|\s)#", unquoted))


def uncommented_keys(text: str) -> list[str]:
    """Key lines with no comment on the line itself or on the line directly above.

    Lines inside block scalars (|, >) are skipped; a block scalar that holds YAML (runtimeEnvYAML) is
    checked separately on its own text.
    """
    lines = text.splitlines()
    missing, block_indent = [], None
    for number, line in enumerate(lines, 1):
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue
            block_indent = None
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped == "---":
            continue
        if KEY_LINE.match(line):
            above = lines[number - 2].strip() if number > 1 else ""
            if not (_has_comment(line) or above.startswith("#")):
                missing.append(f"{number}: {line.strip()}")
        if BLOCK_SCALAR.search(line):
            block_indent = indent
    return missing


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_key_is_commented(path: Path) -> None:
    assert uncommented_keys(path.read_text()) == []


def test_every_runtime_env_yaml_key_is_commented() -> None:
    assert uncommented_keys(_rayjob()["spec"]["runtimeEnvYAML"]) == []


def test_comment_checker_catches_a_bare_key() -> None:
    assert uncommented_keys("# about a\na: 1\nb: 2  # about b\nc:\n  - d: 3\n") == ["4: c:", "5: - d: 3"]
    assert uncommented_keys("s: |  # a script\n  x: not a key\n# t\nt: 1\n") == []
