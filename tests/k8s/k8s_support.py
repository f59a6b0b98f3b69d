"""Shared helpers for tests/k8s: strict schema validation, helm, and building step Jobs the way the
dagster-k8s executor does."""

from __future__ import annotations

import functools
import subprocess
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
INFRA_CHART = REPO_ROOT / "k8s" / "pixtrain-infra"
DAGSTER_VALUES = REPO_ROOT / "k8s" / "dagster-values.yaml"
INFRA_VALUES_FILES = {
    "base": (),
    "dev": (INFRA_CHART / "values-dev.yaml",),
    "prod": (INFRA_CHART / "values-prod.yaml",),
}

# Secret values present in the environment of the process that builds the Jobs. A config that copied
# variables from the submitting process (e.g. env_vars: ["HF_TOKEN"]) would leak them into the Job spec.
SECRET_CANARIES = {
    "HF_TOKEN": "hf_canary_ZZ9",
    "WANDB_API_KEY": "wandb-canary-ZZ9",
    "DAGSTER_PG_PASSWORD": "pg-canary-ZZ9",
    "PIXTRAIN_DB_PASSWORD": "meta-canary-ZZ9",
}

# Oldest supported (1.29) to newest schema kubernetes-validate ships. Field removals and renames between
# versions (e.g. in batch/v1 or policy) would show up as a failure against one of them.
KUBE_VERSIONS = ("1.29.0", "1.31.0", "1.33.0", "1.35.0", "1.37.0")


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.is_file():
        raise AssertionError(f"{path} is missing: run scripts/install-test-tools.sh (make test does)")
    return str(path)


def _cache_schema_files() -> None:
    """kubernetes-validate re-reads its (multi-MB) JSON schema files on every call; read each file once.

    Same schemas, same validator: only the file reads are memoised (4x faster over hundreds of objects).
    """
    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.cache(utils.schema_contents)


def validate_strict(obj: dict[str, Any], versions: tuple[str, ...] = KUBE_VERSIONS) -> None:
    """kubernetes-validate --strict against every version; raises with the object, field and version."""
    import kubernetes_validate

    _cache_schema_files()
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata'].get('name')} is invalid for Kubernetes {version} at {where}: "
                f"{error.message}"
            ) from None
        except kubernetes_validate.SchemaNotFoundError as error:
            raise AssertionError(f"no schema for {obj['apiVersion']} {obj['kind']} in {version}: {error}") from None


# ---- helm ------------------------------------------------------------------------------------------------


def helm(*args: str | Path) -> str:
    result = subprocess.run([tool("helm"), *map(str, args)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def helm_template(chart: Path, *values_files: Path) -> list[dict[str, Any]]:
    args: list[str | Path] = ["template", "pixtrain-infra", chart, "--namespace", "pixtrain-system"]
    for values in values_files:
        args += ["-f", values]
    # helm test hooks are part of the release too: render them so they get the same checks.
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


# ---- step Jobs through the real dagster-k8s executor path -------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def run_launcher_config_from_chart_values(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    """K8sRunLauncher config as the Dagster chart writes it into dagster.yaml from our values.

    Mirrors helm/dagster/templates/helpers/instance/_run-launcher.tpl for the keys we set (the chart itself
    is not available offline), so step Jobs are built on the same run-launcher layer as in the cluster.
    """
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s_config = launcher.get("runK8sConfig", {})
    snake = {
        "containerConfig": "container_config",
        "podSpecConfig": "pod_spec_config",
        "podTemplateSpecMetadata": "pod_template_spec_metadata",
        "jobSpecConfig": "job_spec_config",
        "jobMetadata": "job_metadata",
    }
    return {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or namespace,
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": values["serviceAccount"]["name"],
        "dagster_home": values["global"]["dagsterHome"],
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "env_config_maps": ["dagster-pipeline-env"] + [c["name"] for c in launcher.get("envConfigMaps", [])],
        "env_secrets": [s["name"] for s in launcher.get("envSecrets", [])],
        "env_vars": list(launcher.get("envVars", [])),
        "volumes": list(launcher.get("volumes", [])),
        "volume_mounts": list(launcher.get("volumeMounts", [])),
        "fail_pod_on_run_failure": launcher.get("failPodOnRunFailure", False),
        "run_k8s_config": {snake[k]: v for k, v in run_k8s_config.items()},
    }


def build_step_jobs(
    job_def, executor_def, instance, image: str = "registry.example.com/pixtrain:test", run_config: dict | None = None
):
    """The V1Job the k8s executor submits for every step of ``job_def``, keyed by step key.

    Runs dagster-k8s's own code path (executor init, container-context merge of run launcher + executor
    config + op tags, construct_dagster_k8s_job) with a MagicMock batch API, as dagster's test_executor.py
    does; nothing reaches a cluster. ``run_config``: the run's config (its ``execution.config`` goes to the executor).
    """
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from dagster._core.test_utils import create_run_for_test
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s.client import DagsterKubernetesClient

    in_memory_job = InMemoryJob(job_def)
    run_config = run_config or {}
    mapped = executor_def.apply_config_mapping({"config": (run_config.get("execution") or {}).get("config") or {}})
    assert mapped.success, mapped.errors
    with mock.patch("kubernetes.config.load_incluster_config"):
        executor = executor_def.executor_creation_fn(
            InitExecutorContext(
                job=in_memory_job,
                executor_def=executor_def,
                executor_config=mapped.value["config"],
                instance=instance,
            )
        )
    batch_api = mock.MagicMock()
    step_handler = executor._step_handler  # noqa: SLF001 - the object under test
    step_handler._api_client = DagsterKubernetesClient.production_client(  # noqa: SLF001
        batch_api_override=batch_api, core_api_override=mock.MagicMock()
    )

    # The origin only travels inside the step's arguments; it points at the real code location module.
    job_origin = (
        ReconstructableRepository.for_module("pixtrain_dagster.definitions", "defs", str(REPO_ROOT))
        .get_reconstructable_job(job_def.name)
        .get_python_origin()
    )
    job_origin = job_origin._replace(repository_origin=job_origin.repository_origin._replace(container_image=image))
    run = create_run_for_test(
        instance, job_name=job_def.name, job_code_origin=job_origin, run_id=str(uuid.uuid4()), run_config=run_config
    )
    plan = create_execution_plan(job_def)
    plan_context = PlanOrchestrationContext(
        plan_data=PlanData(
            job=in_memory_job,
            dagster_run=run,
            instance=instance,
            execution_plan=plan,
            raise_on_error=True,
            retry_mode=RetryMode.DISABLED,
        ),
        log_manager=create_context_free_log_manager(instance, run),
        executor=executor,
        output_capture=None,
    )
    jobs = {}
    for step in plan.steps:
        batch_api.reset_mock()
        context = StepHandlerContext(
            instance=instance,
            plan_context=plan_context,
            steps=[step],
            execute_step_args=ExecuteStepArgs(job_origin, run.run_id, [step.key]),
        )
        list(step_handler.launch_step(context))
        (call,) = batch_api.create_namespaced_job.call_args_list
        jobs[step.key] = (call.kwargs["body"], call.kwargs["namespace"])
    return executor, jobs


def api_dict(k8s_object) -> dict[str, Any]:
    """A kubernetes client model as the camelCase JSON the API server receives."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(k8s_object)
