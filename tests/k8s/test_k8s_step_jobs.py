"""The Kubernetes Jobs the dagster-k8s executor submits for each asset step, built offline through the
executor's own code path, and the executor selection that keeps the demo free of any cluster."""

from __future__ import annotations

import json

import pytest
from dagster import ExecutorDefinition

from pixtrain_dagster.execution import (
    CONTAINER_SECURITY_CONTEXT,
    GPU_TAG_KEY,
    K8S_CONFIG_TAG,
    READ_ONLY_PATH_ENV,
    WRITABLE_PATH_ENV,
    ExecutionSettings,
    ExecutionSettingsError,
    executor_from_env,
    step_pod_tags,
)

from .k8s_support import SECRET_CANARIES, api_dict, validate_strict
from .pod_security import violations

# Which steps need GPUs. Every step of the pipeline must be listed: a new asset forces a decision here.
GPU_STEPS = {"lora_training", "adapter_evaluation", "bias_report"}
CPU_STEPS = {
    "base_model",
    "raw_conversations",
    "training_dataset",
    "promoted_adapter",
    "artifact_backup",
    # the gates read published artifacts (the bias gate re-scores a stored report): no GPU
    "training_dataset_checks",
    "adapter_evaluation_training_sanity",
    "bias_report_bias_gate",
}
EXPECTED_SECRET_REFS = {
    "HF_TOKEN": ("pixtrain-hf-token", "HF_TOKEN"),
    "WANDB_API_KEY": ("pixtrain-wandb", "WANDB_API_KEY"),
    "DAGSTER_PG_PASSWORD": ("dagster-postgresql-secret", "postgresql-password"),
    "PIXTRAIN_DB_PASSWORD": ("pixtrain-metadata-db", "password"),
}


def _pod(job) -> dict:
    return api_dict(job)["spec"]["template"]["spec"]


def _container(job) -> dict:
    (container,) = _pod(job)["containers"]
    return container


def test_every_step_has_a_declared_pod_shape(k8s_step_jobs):
    steps = set(k8s_step_jobs)
    assert steps <= GPU_STEPS | CPU_STEPS, f"steps without a decided pod shape: {steps - GPU_STEPS - CPU_STEPS}"
    assert {"lora_training", "adapter_evaluation"} <= steps


def test_gpu_steps_get_gpus_cpu_memory_node_selector_toleration_and_shm(k8s_step_jobs):
    settings = ExecutionSettings.from_env({})
    for step, (job, _) in k8s_step_jobs.items():
        if step not in GPU_STEPS:
            continue
        pod, container = _pod(job), _container(job)
        amounts = {"cpu": settings.gpu_cpu, "memory": settings.gpu_memory, "nvidia.com/gpu": str(settings.gpu_count)}
        assert container["resources"] == {"requests": amounts, "limits": amounts}, step
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, step
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], step
        assert pod["priorityClassName"] == "pixtrain-training", step
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": settings.gpu_shm_size}, step
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], step
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True", step
        assert env["PIXTRAIN_REQUIRE_GPU"] == "1", step  # device auto fails rather than run on the CPU
        assert job.spec.backoff_limit == 0, "a failed GPU step must not silently retry (dagster issue #33755)"


def test_cpu_steps_get_small_pods_that_cannot_land_on_gpu_nodes(k8s_step_jobs):
    for step, (job, _) in k8s_step_jobs.items():
        if step not in CPU_STEPS:
            continue
        pod, container = _pod(job), _container(job)
        assert container["resources"] == {
            "requests": {"cpu": "2", "memory": "16Gi"},
            "limits": {"cpu": "2", "memory": "16Gi"},
        }, step
        assert "nvidia.com/gpu" not in json.dumps(pod), step
        assert not pod.get("tolerations") and not pod.get("nodeSelector"), step
        assert not any(v["name"] == "dshm" for v in pod["volumes"]), step
        assert "PIXTRAIN_REQUIRE_GPU" not in {e["name"] for e in container["env"]}, step


def test_step_pods_are_hardened_and_have_no_api_token(k8s_step_jobs):
    for step, (job, namespace) in k8s_step_jobs.items():
        pod, container = _pod(job), _container(job)
        assert namespace == "pixtrain", step
        assert violations(pod) == [], step
        assert container["securityContext"] == api_dict_of(CONTAINER_SECURITY_CONTEXT), step
        assert pod["securityContext"]["runAsUser"] == 1001 and pod["securityContext"]["fsGroup"] == 1001, step
        # The run launcher layer gives run workers a token; steps must override it.
        assert pod["automountServiceAccountToken"] is False, step
        assert pod["serviceAccountName"] == "pixtrain-step", step
        assert pod["enableServiceLinks"] is False, step


def test_only_volumes_are_writable_and_every_path_variable_points_into_one(k8s_step_jobs):
    for step, (job, _) in k8s_step_jobs.items():
        pod, container = _pod(job), _container(job)
        names = [v["name"] for v in pod["volumes"]]
        mount_paths = [m["mountPath"] for m in container["volumeMounts"]]
        # Run-launcher and executor layers are merged: duplicates would make the API server reject the pod.
        assert len(names) == len(set(names)), f"{step}: duplicate volumes {names}"
        assert len(mount_paths) == len(set(mount_paths)), f"{step}: duplicate mounts {mount_paths}"
        assert {m["name"] for m in container["volumeMounts"]} <= set(names), step
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        env = {e["name"]: e.get("value") for e in container["env"]}
        for variable, path in WRITABLE_PATH_ENV.items():
            assert env[variable] == path, f"{step}: {variable}"
            assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (
                f"{step}: {variable}={path} is not inside a writable volume {sorted(writable)}"
            )
        for variable, path in READ_ONLY_PATH_ENV.items():
            assert env[variable] == path
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
            assert mount["readOnly"] is True, f"{step}: {path} must be mounted read-only"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"pixtrain-cache", "pixtrain-model-output", "pixtrain-checkpoints", "pixtrain-training-data"}


def test_env_names_are_unique_and_secrets_are_references_only(k8s_step_jobs):
    for step, (job, _) in k8s_step_jobs.items():
        container = _container(job)
        names = [e["name"] for e in container["env"]]
        assert len(names) == len(set(names)), (
            f"{step}: duplicate env vars {sorted(n for n in names if names.count(n) > 1)}"
        )
        env = {e["name"]: e for e in container["env"]}
        for variable, (secret, key) in EXPECTED_SECRET_REFS.items():
            if variable not in env:  # each step gets only its own secrets (test_k8s_least_privilege.py)
                continue
            assert "value" not in env[variable], f"{step}: {variable} must not carry a value"
            assert env[variable]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}, step
        assert {"configMapRef": {"name": "pixtrain-execution-env"}} in container["envFrom"], step


def test_every_step_sizes_its_thread_pools_by_its_cpu_limit_not_the_nodes_cores(k8s_step_jobs):
    """torch and OpenMP count the node's cores; the downward API gives OMP_NUM_THREADS the container's CPU limit
    (rounded up to whole CPUs by the kubelet)."""
    for step, (job, _) in k8s_step_jobs.items():
        env = {e["name"]: e for e in _container(job)["env"]}
        assert env["OMP_NUM_THREADS"] == {
            "name": "OMP_NUM_THREADS",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
        }, step


def test_no_secret_value_reaches_a_job(k8s_step_jobs):
    """The Jobs were built with secret values in the environment (SECRET_CANARIES): none may be copied."""
    for step, (job, _) in k8s_step_jobs.items():
        text = json.dumps(api_dict(job))
        leaked = [name for name, value in SECRET_CANARIES.items() if value in text]
        assert not leaked, f"{step}: values of {leaked} were copied into the Job"


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_step_jobs_are_valid_kubernetes_for_every_supported_version(k8s_step_jobs, kind):
    steps = GPU_STEPS if kind == "gpu" else CPU_STEPS
    for step, (job, _) in k8s_step_jobs.items():
        if step in steps:
            validate_strict(api_dict(job))


def test_strict_validation_rejects_a_misspelled_field(k8s_step_jobs):
    """The validator must be able to fail: a typo in a security field is not silently accepted."""
    job = api_dict(next(iter(k8s_step_jobs.values()))[0])
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(AssertionError, match="readOnlyRootFileSystem"):
        validate_strict(job, versions=("1.29.0",))


# ---- executor selection -------------------------------------------------------------------------------------


def test_local_executors_need_no_cluster_and_no_dagster_k8s():
    import subprocess
    import sys

    code = (
        "import sys; from pixtrain_dagster.execution import executor_from_env; "
        "choices = ('', 'in_process', 'in-process', 'multiprocess'); "
        "names = [executor_from_env({'PIXTRAIN_EXECUTOR': v}).name for v in choices]; "
        "print(names, 'dagster_k8s' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['multiprocess', 'in_process', 'in_process', 'multiprocess'] False"


def test_k8s_executor_is_configured_from_the_settings():
    executor = executor_from_env(
        {"PIXTRAIN_EXECUTOR": "k8s", "PIXTRAIN_K8S_NAMESPACE": "team-a", "PIXTRAIN_IMAGE": "img:1"}
    )
    assert isinstance(executor, ExecutorDefinition) and executor.name == "k8s"
    mapped = executor.apply_config_mapping({})
    assert mapped.success, mapped.errors
    config = mapped.value["config"]
    assert config["job_namespace"] == "team-a" and config["job_image"] == "img:1"
    assert config["service_account_name"] == "pixtrain-step"
    assert config["tag_concurrency_limits"] == [{"key": GPU_TAG_KEY, "value": "true", "limit": 1}]


def test_invalid_executor_names_the_variable_and_the_choices():
    with pytest.raises(ExecutionSettingsError, match=r"PIXTRAIN_EXECUTOR='celery'.*in_process, multiprocess, k8s"):
        executor_from_env({"PIXTRAIN_EXECUTOR": "celery"})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PIXTRAIN_GPU_COUNT", "0", "PIXTRAIN_GPU_COUNT='0' must be a whole number >= 1"),
        ("PIXTRAIN_GPU_MEMORY", "64 GB", "PIXTRAIN_GPU_MEMORY='64 GB' is not a Kubernetes quantity"),
        ("PIXTRAIN_GPU_NODE_SELECTOR", "gpu", "PIXTRAIN_GPU_NODE_SELECTOR='gpu'"),
    ],
)
def test_invalid_settings_name_the_variable(variable, value, message):
    with pytest.raises(ExecutionSettingsError, match=message):
        ExecutionSettings.from_env({variable: value})


def test_gpu_shape_follows_the_settings():
    settings = ExecutionSettings.from_env(
        {
            "PIXTRAIN_GPU_COUNT": "4",
            "PIXTRAIN_GPU_CPU": "48",
            "PIXTRAIN_GPU_MEMORY": "320Gi",
            "PIXTRAIN_GPU_NODE_SELECTOR": "pool=a100,zone=b",
            "PIXTRAIN_GPU_PRIORITY_CLASS": "none",
        }
    )
    config = step_pod_tags("gpu", settings)[K8S_CONFIG_TAG]
    assert config["container_config"]["resources"]["limits"] == {"cpu": "48", "memory": "320Gi", "nvidia.com/gpu": "4"}
    assert config["pod_spec_config"]["node_selector"] == {"pool": "a100", "zone": "b"}
    assert "priority_class_name" not in config["pod_spec_config"]


def test_step_pod_tags_returns_independent_copies():
    tags = step_pod_tags("gpu")
    tags[K8S_CONFIG_TAG]["container_config"]["resources"]["limits"]["cpu"] = "1"
    assert step_pod_tags("gpu")[K8S_CONFIG_TAG]["container_config"]["resources"]["limits"]["cpu"] == "16"
    assert step_pod_tags("gpu")[GPU_TAG_KEY] == "true" and GPU_TAG_KEY not in step_pod_tags("cpu")


def test_unknown_step_kind_is_rejected():
    with pytest.raises(ValueError, match="'gpu' or 'cpu'"):
        step_pod_tags("tpu")  # type: ignore[arg-type]


def api_dict_of(snake: dict) -> dict:
    """A security context written with python-client names, as the API (camelCase) form."""
    from dagster_k8s.models import k8s_model_from_dict
    from kubernetes.client import V1SecurityContext

    return api_dict(k8s_model_from_dict(V1SecurityContext, snake))
