"""Issue 4, point 3: the whole pipeline runs as an unprivileged user with HOME, the checkout and the rest
of the filesystem read-only, and only the paths the pods mount as volumes writable.

The writable folders are derived from pixtrain_dagster/execution.py (the same volumes and environment
variables the step pods get), re-rooted under a temporary folder; the sample conversations sit in a
read-only folder, as on the cluster's read-only training-data volume. A control run in the same sandbox
proves the sandbox really forbids writes elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pixtrain_dagster import execution

from .hardened_sandbox import run_hardened
from .k8s_support import REPO_ROOT

UID = execution.RUNTIME_UID
SAMPLE_DATASET = REPO_ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create the mount namespace and drop to uid 1001"
)


class Sandbox:
    """Folders and environment of one hardened run, mirroring a step pod."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"  # exists but belongs to root: not writable for uid 1001
        self.read_only = root / "read-only"
        self.stash = root / "stash"
        settings = execution.ExecutionSettings.from_env({})
        _, mounts = execution.step_volumes(settings)
        # One writable folder per writable pod volume, at <root>/volumes/<volume name>.
        self.volumes = {m["mount_path"]: root / "volumes" / m["name"] for m in mounts if not m.get("read_only")}
        self.env_paths: dict[str, Path] = {}
        for variable, pod_path in execution.WRITABLE_PATH_ENV.items():
            mount_path = max((m for m in self.volumes if pod_path == m or pod_path.startswith(m + "/")), key=len)
            self.env_paths[variable] = self.volumes[mount_path] / os.path.relpath(pod_path, mount_path)
        self.training_data = self.read_only / "training"

    def create(self) -> None:
        for folder in (self.home, self.training_data, self.stash):
            folder.mkdir(parents=True)
        for volume in self.volumes.values():
            volume.mkdir(parents=True)
            os.chown(volume, UID, UID)  # as fsGroup does for the pod's volumes
        for folder in (self.root, self.root / "volumes", self.read_only, self.home):
            folder.chmod(0o755)

    def env(self) -> dict[str, str]:
        venv_bin = Path(sys.executable).parent
        return {
            "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
            "PIXTRAIN_EXECUTOR": "multiprocess",  # one process per step, as one pod per step
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **{name: str(path) for name, path in self.env_paths.items()},
            "PIXTRAIN_TRAINING_DATA_DIR": str(self.training_data),
        }

    def run(self, command: list[str], timeout: int = 900):
        return run_hardened(
            command,
            writable=list(self.volumes.values()),
            reachable=[REPO_ROOT, Path(sys.executable).parent.parent, Path(sys.base_prefix).resolve()],
            env=self.env(),
            cwd=REPO_ROOT,
            stash_dir=self.stash,
            uid=UID,
            timeout=timeout,
        )


@pytest.fixture
def sandbox():
    # Not pytest's tmp_path: its parents are private to root, and uid 1001 must reach the sandbox.
    root = Path(tempfile.mkdtemp(prefix="pixtrain-hardening-"))
    box = Sandbox(root)
    box.create()
    yield box
    shutil.rmtree(root, ignore_errors=True)


PROBE = """
import json, os, sys, tempfile
def writable(path):
    try:
        fd, name = tempfile.mkstemp(dir=path); os.close(fd); os.unlink(name); return True
    except OSError:
        return False
paths = json.loads(sys.argv[1])
print(json.dumps({"uid": os.getuid(), "groups": os.getgroups(), "results": {p: writable(p) for p in paths}}))
"""


def test_sandbox_allows_writes_only_to_the_volumes(sandbox):
    """Control: the same sandbox the pipeline runs in forbids writes to the checkout, HOME, / and /tmp."""
    must_fail = [
        str(REPO_ROOT),
        str(REPO_ROOT / "pixtrain_dagster"),
        str(sandbox.home),
        "/",
        "/tmp",
        str(sandbox.training_data),
        str(Path(sys.executable).parent),
    ]
    must_work = [str(v) for v in sandbox.volumes.values()]
    result = sandbox.run([sys.executable, "-c", PROBE, json.dumps(must_fail + must_work)], timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["uid"] == UID and report["groups"] == []
    assert {p: report["results"][p] for p in must_fail} == dict.fromkeys(must_fail, False)
    assert {p: report["results"][p] for p in must_work} == dict.fromkeys(must_work, True)


@pytest.mark.slow
def test_whole_pipeline_runs_as_uid_1001_with_only_the_volumes_writable(sandbox, tiny_model_dir):
    from support import tiny_run_config  # tests/conftest.py: the tiny model's run config for the whole graph

    model = sandbox.read_only / "tiny-model"
    shutil.copytree(tiny_model_dir, model)
    shutil.copy(SAMPLE_DATASET, sandbox.training_data / SAMPLE_DATASET.name)
    (sandbox.env_paths["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    (sandbox.env_paths["DAGSTER_HOME"] / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_config = sandbox.read_only / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(tiny_run_config(model)))
    for path in sandbox.read_only.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    result = sandbox.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "pixtrain_dagster.definitions",
            "--select",
            "*",
            "-c",
            str(run_config),
        ]
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "RUN_SUCCESS" in output, output[-3000:]
    artifacts = sandbox.env_paths["PIXTRAIN_ARTIFACT_ROOT"]
    for asset in ("lora_adapter", "training_checkpoints", "adapter_evaluation"):
        assert (artifacts / "dagster" / "assets" / f"{asset}.json").is_file(), asset
