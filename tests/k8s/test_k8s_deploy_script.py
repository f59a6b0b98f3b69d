"""scripts/deploy-training-infrastructure.sh: syntax, and its --dry-run (render + validate, no cluster)."""

from __future__ import annotations

import os
import subprocess

import pytest

from .k8s_support import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "deploy-training-infrastructure.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    # No kubeconfig and no cluster: a dry run must not need either.
    environment = {**os.environ, "KUBECONFIG": "/nonexistent", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=environment)


@pytest.mark.parametrize("script", ["deploy-training-infrastructure.sh", "install-test-tools.sh"])
def test_scripts_parse_and_use_strict_mode(script):
    path = REPO_ROOT / "scripts" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "set -Eeuo pipefail" in path.read_text() or "set -euo pipefail" in path.read_text()
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("env_name", ["dev", "prod"])
def test_dry_run_renders_and_validates(env_name):
    # Two versions suffice here: test_k8s_infra_chart validates the chart against all of them.
    # prod pins every image by digest, the code location's too (test_k8s_least_privilege.py).
    digest = ["--image-digest", "sha256:" + "ab" * 32] if env_name == "prod" else []
    result = run_script("--env", env_name, "--dry-run", "--image-tag", "1.2.3", *digest, KUBE_VERSIONS="1.29.0 1.37.0")
    assert result.returncode == 0, result.stderr
    assert f"dry run OK: env={env_name}" in result.stderr
    assert "kubernetes-validate --strict" in result.stderr


def test_dry_run_fails_on_an_invalid_manifest(tmp_path):
    """Point the Dagster chart at a local chart with a broken Deployment: the dry run must fail."""
    chart = tmp_path / "broken-chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: broken\nversion: 0.1.0\n")
    (chart / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
        "spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n"
        "    spec:\n      containers:\n        - name: x\n          image: x\n"
        "          securityContext: {readOnlyRootFileSystem: true}\n"
    )
    result = run_script("--env", "dev", "--dry-run", DAGSTER_CHART=str(chart), KUBE_VERSIONS="1.29.0")
    assert result.returncode != 0
    assert "not valid for Kubernetes 1.29.0" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run"], "--env is required"),
        (["--env", "staging", "--dry-run"], "--env must be dev or prod"),
        (["--env", "dev", "--dry-run", "--image-tag", "bad tag;rm"], "not a valid image tag"),
        (["--env", "dev", "--bogus"], "unknown argument: --bogus"),
    ],
)
def test_bad_arguments_are_rejected_with_a_reason(args, message):
    result = run_script(*args)
    assert result.returncode != 0 and message in result.stderr
