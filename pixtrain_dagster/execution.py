"""Where each step runs: the executor choice and the Kubernetes pod shape of every asset step.

Locally (the demo, the tests) steps run in-process or as subprocesses and nothing here needs a cluster.
In the cluster, the dagster-k8s executor runs each step as its own Kubernetes Job; this module is the one
place that says what those Jobs look like:

* ``executor_from_env()`` picks the executor from ``PIXTRAIN_EXECUTOR`` and, for ``k8s``, configures the
  settings every step pod shares: namespace, image, service account, Secrets by reference, volumes, the
  writable-path environment and the hardened security contexts.
* ``step_pod_tags(kind)`` returns the op tags that give a step its shape: GPU steps get GPUs, CPU and
  memory, a GPU node selector and toleration and a memory-backed ``/dev/shm``; CPU steps get a small pod.

Hardening (HIPAA; Pod Security Standard "restricted"): every pod and container runs as uid 1001, non-root,
with a read-only root filesystem, no capabilities, seccomp ``RuntimeDefault`` and no privilege escalation.
The only writable paths are the volumes in ``WRITABLE_PATH_ENV`` / ``step_volumes``; the environment
variables point every library cache there. tests/k8s checks the Jobs that come out of this, and runs the
pipeline as an unprivileged user with only these paths writable.

Deliberately light: importing this module imports only dagster; ``dagster_k8s`` is imported only when the
k8s executor is selected, so loading the code location locally stays fast.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dagster import ExecutorDefinition, Field, Permissive, in_process_executor, multiprocess_executor

from .core.settings import REQUIRE_GPU_ENV

StepKind = Literal["gpu", "cpu"]

# ---- identity and paths shared by the image, the pods and the hardening test -----------------------------

# docker/Dockerfile creates this user; pods must run as it so file ownership on the volumes (fsGroup) lines up.
RUNTIME_UID = 1001
RUNTIME_GID = 1001

# The image's DAGSTER_HOME (docker/Dockerfile). In pods it is a writable emptyDir: step and run processes
# get their instance from the serialized instance ref, so nothing from the image's copy is needed there.
DAGSTER_HOME_PATH = "/opt/dagster/dagster_home"
TMP_PATH = "/tmp"
CACHE_ROOT = "/var/cache/pixtrain"  # HF / torch / Triton / CUDA caches: a shared PVC, so downloads happen once
WANDB_ROOT = "/var/lib/pixtrain/wandb"  # W&B run files: pod-local, synced to the server by wandb itself
ARTIFACT_ROOT = "/data/artifacts"  # model output PVC: datasets, adapters, reports (steps share no other disk)
CHECKPOINT_ROOT = "/data/checkpoints"  # training checkpoints PVC, so a restarted training step can resume
TRAINING_DATA_ROOT = "/data/training"  # shared raw training data, mounted read-only
SHM_PATH = "/dev/shm"  # DataLoader workers and NCCL exchange tensors here; the container default is 64Mi
# Fixed, not configurable: k8s/dagster-values.yaml declares the same tmp and dagster-home volumes for run
# pods, and dagster-k8s merges the two layers into one volume only when they are identical.
TMP_SIZE = "20Gi"
DAGSTER_HOME_SIZE = "1Gi"

# Every environment variable that names a writable location, and where it points inside a pod. The
# hardening test re-roots these same names under a temporary folder, so the pods and the test cannot drift.
WRITABLE_PATH_ENV: Mapping[str, str] = {
    "TMPDIR": TMP_PATH,
    "DAGSTER_HOME": DAGSTER_HOME_PATH,
    "PIXTRAIN_ARTIFACT_ROOT": ARTIFACT_ROOT,
    "PIXTRAIN_CHECKPOINT_DIR": CHECKPOINT_ROOT,
    "HF_HOME": f"{CACHE_ROOT}/huggingface",
    "TORCH_HOME": f"{CACHE_ROOT}/torch",
    "TRITON_CACHE_DIR": f"{CACHE_ROOT}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_ROOT}/torchinductor",
    "CUDA_CACHE_PATH": f"{CACHE_ROOT}/cuda",  # CUDA JIT cache, else ~/.nv (read-only HOME)
    "XDG_CACHE_HOME": f"{CACHE_ROOT}/xdg",  # catch-all for libraries that follow the XDG spec
    "WANDB_DIR": WANDB_ROOT,
    "WANDB_CACHE_DIR": f"{CACHE_ROOT}/wandb",
    "WANDB_CONFIG_DIR": f"{WANDB_ROOT}/config",  # else ~/.config/wandb
    "WANDB_DATA_DIR": f"{WANDB_ROOT}/data",  # else ~/.local/share/wandb
    "WANDB_ARTIFACT_DIR": f"{WANDB_ROOT}/artifacts",  # else ./artifacts in the working directory
}
# Read-only inputs: set in pods, but the hardening test must not make them writable.
READ_ONLY_PATH_ENV: Mapping[str, str] = {"PIXTRAIN_TRAINING_DATA_DIR": TRAINING_DATA_ROOT}

# Prometheus scrapes every step pod on this named port (k8s/pixtrain-infra: PodMonitor "pixtrain-steps",
# NetworkPolicy "allow-metrics-scrape"; monitoring.metricsPort / monitoring.podLabels must match these).
METRICS_PORT = 9400
METRICS_PORT_NAME = "metrics"
METRICS_POD_LABELS: Mapping[str, str] = {"pixtrain/metrics": "true"}

# ---- tags --------------------------------------------------------------------------------------------------

K8S_CONFIG_TAG = "dagster-k8s/config"
# Marks GPU steps (op tag) and GPU runs (run tag). The executors limit concurrent GPU steps within a run by
# the op tag; the QueuedRunCoordinator (k8s/dagster-values.yaml) limits concurrent GPU runs by the run tag.
GPU_TAG_KEY = "pixtrain/gpu"
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's extended resource
GPU_RUN_TAGS: Mapping[str, str] = {GPU_TAG_KEY: "true"}

# Secrets a step may ask for (op tags, ``step_pod_tags(kind, secrets=...)``): each step pod gets only the ones its
# asset declares, never all of them. The names are the variables in the pod; the Secrets come from the settings.
HF_TOKEN_ENV = "HF_TOKEN"  # only where a hub model is resolved (base_model)
WANDB_API_KEY_ENV = "WANDB_API_KEY"  # only training logs to W&B
METADATA_DB_PASSWORD_ENV = "PIXTRAIN_DB_PASSWORD"  # only steps that write the training metadata store

EXECUTOR_ENV_VAR = "PIXTRAIN_EXECUTOR"
EXECUTOR_CHOICES = ("in_process", "multiprocess", "k8s")

# ---- security contexts (python-client field names; dagster-k8s accepts them as they are) ------------------

# Full contexts everywhere: a container_config.security_context REPLACES the executor's, it does not merge.
CONTAINER_SECURITY_CONTEXT: Mapping[str, Any] = {
    "run_as_user": RUNTIME_UID,
    "run_as_group": RUNTIME_GID,
    "run_as_non_root": True,
    "read_only_root_filesystem": True,
    "allow_privilege_escalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccomp_profile": {"type": "RuntimeDefault"},
}
POD_SECURITY_CONTEXT: Mapping[str, Any] = {
    "run_as_user": RUNTIME_UID,
    "run_as_group": RUNTIME_GID,
    "run_as_non_root": True,
    "fs_group": RUNTIME_GID,  # volumes become group-writable for uid 1001
    "fs_group_change_policy": "OnRootMismatch",  # don't chown a 500Gi PVC on every pod start
    "seccomp_profile": {"type": "RuntimeDefault"},
}


# ---- typed settings from the environment -------------------------------------------------------------------

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_LABEL_PAIR = re.compile(r"^[A-Za-z0-9./_-]+=[A-Za-z0-9._-]*$")


class ExecutionSettingsError(ValueError):
    """An execution environment variable has a value that cannot work; the message names it."""


def _env(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value or default


def _quantity(environ: Mapping[str, str], name: str, default: str) -> str:
    value = _env(environ, name, default)
    if not _QUANTITY.match(value):
        raise ExecutionSettingsError(f"{name}={value!r} is not a Kubernetes quantity; use e.g. '16', '500m', '64Gi'")
    return value


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = _env(environ, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ExecutionSettingsError(f"{name}={raw!r} must be a whole number >= 1")
    return value


def _label_pairs(environ: Mapping[str, str], name: str, default: str) -> tuple[tuple[str, str], ...]:
    raw = _env(environ, name, default)
    pairs = [p.strip() for p in raw.split(",") if p.strip()]
    bad = [p for p in pairs if not _LABEL_PAIR.match(p)]
    if bad:
        raise ExecutionSettingsError(f"{name}={raw!r}: write label selectors as key=value[,key=value], not {bad}")
    return tuple(tuple(p.split("=", 1)) for p in pairs)  # a tuple keeps the settings hashable


@dataclass(frozen=True)
class ExecutionSettings:
    """What varies between clusters, read once from PIXTRAIN_* variables (k8s/pixtrain-infra sets them)."""

    namespace: str
    image: str | None  # None: steps use the image the code location runs (pinned by the deployment)
    image_pull_policy: str
    step_service_account: str
    # Secrets are passed by reference only: (env var in the pod, Secret name, key in the Secret).
    secret_env: tuple[tuple[str, str, str], ...]
    cache_claim: str
    artifacts_claim: str
    checkpoints_claim: str
    training_data_claim: str
    gpu_count: int
    gpu_cpu: str
    gpu_memory: str
    gpu_shm_size: str
    gpu_node_selector: tuple[tuple[str, str], ...]
    gpu_toleration_key: str
    gpu_priority_class: str
    pytorch_cuda_alloc_conf: str
    cpu_cpu: str
    cpu_memory: str
    max_concurrent_gpu_steps: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExecutionSettings:
        env = os.environ if environ is None else environ
        return cls(
            namespace=_env(env, "PIXTRAIN_K8S_NAMESPACE", "pixtrain"),
            image=env.get("PIXTRAIN_IMAGE", "").strip() or None,
            image_pull_policy=_env(env, "PIXTRAIN_IMAGE_PULL_POLICY", "IfNotPresent"),
            step_service_account=_env(env, "PIXTRAIN_STEP_SERVICE_ACCOUNT", "pixtrain-step"),
            secret_env=(
                ("HF_TOKEN", _env(env, "PIXTRAIN_HF_TOKEN_SECRET", "pixtrain-hf-token"), "HF_TOKEN"),
                ("WANDB_API_KEY", _env(env, "PIXTRAIN_WANDB_SECRET", "pixtrain-wandb"), "WANDB_API_KEY"),
                # Training metadata database (pixtrain_dagster.metadata); host/user/name come from the
                # pixtrain-execution-env ConfigMap as PIXTRAIN_DB_HOST etc.
                ("PIXTRAIN_DB_PASSWORD", _env(env, "PIXTRAIN_DB_PASSWORD_SECRET", "pixtrain-metadata-db"), "password"),
                # The Dagster database password reaches step pods through the run launcher
                # (postgres_password_secret -> DAGSTER_PG_PASSWORD); repeating it here would duplicate it.
            ),
            cache_claim=_env(env, "PIXTRAIN_CACHE_CLAIM", "pixtrain-cache"),
            artifacts_claim=_env(env, "PIXTRAIN_ARTIFACTS_CLAIM", "pixtrain-model-output"),
            checkpoints_claim=_env(env, "PIXTRAIN_CHECKPOINTS_CLAIM", "pixtrain-checkpoints"),
            training_data_claim=_env(env, "PIXTRAIN_TRAINING_DATA_CLAIM", "pixtrain-training-data"),
            gpu_count=_positive_int(env, "PIXTRAIN_GPU_COUNT", 1),
            gpu_cpu=_quantity(env, "PIXTRAIN_GPU_CPU", "16"),
            gpu_memory=_quantity(env, "PIXTRAIN_GPU_MEMORY", "64Gi"),
            gpu_shm_size=_quantity(env, "PIXTRAIN_GPU_SHM_SIZE", "16Gi"),
            # Label published by NVIDIA GPU feature discovery (part of the GPU operator).
            gpu_node_selector=_label_pairs(env, "PIXTRAIN_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true"),
            gpu_toleration_key=_env(env, "PIXTRAIN_GPU_TOLERATION_KEY", "nvidia.com/gpu"),
            # "none" turns it off for clusters without k8s/pixtrain-infra's PriorityClass.
            gpu_priority_class=_env(env, "PIXTRAIN_GPU_PRIORITY_CLASS", "pixtrain-training"),
            # Less fragmentation on long LoRA runs with varying sequence lengths.
            pytorch_cuda_alloc_conf=_env(env, "PIXTRAIN_PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
            cpu_cpu=_quantity(env, "PIXTRAIN_CPU_CPU", "2"),
            # base_model loads full weights on a CPU pod, so "small" still means enough memory for that.
            cpu_memory=_quantity(env, "PIXTRAIN_CPU_MEMORY", "16Gi"),
            max_concurrent_gpu_steps=_positive_int(env, "PIXTRAIN_MAX_CONCURRENT_GPU_STEPS", 1),
        )


@functools.cache
def load_settings() -> ExecutionSettings:
    """The process's settings, read once (definitions are loaded once per process)."""
    return ExecutionSettings.from_env()


def _settings_for(environ: Mapping[str, str] | None) -> ExecutionSettings:
    return load_settings() if environ is None else ExecutionSettings.from_env(environ)


# ---- pod pieces --------------------------------------------------------------------------------------------


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    # requests == limits: Guaranteed QoS, so the kubelet never evicts a training step for memory pressure
    # it did not cause. GPUs are extended resources, which must have requests == limits anyway.
    amounts = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def step_volumes(settings: ExecutionSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts every step pod gets: the only writable paths besides GPU pods' /dev/shm.

    The hardening test lays out its writable folders from the same list.
    """
    volumes = [
        # tmp and dagster-home: see TMP_SIZE (declared identically for run pods in k8s/dagster-values.yaml).
        {"name": "tmp", "empty_dir": {"size_limit": TMP_SIZE}},
        {"name": "dagster-home", "empty_dir": {"size_limit": DAGSTER_HOME_SIZE}},
        {"name": "wandb", "empty_dir": {"size_limit": "10Gi"}},
        {"name": "cache", "persistent_volume_claim": {"claim_name": settings.cache_claim}},
        {"name": "artifacts", "persistent_volume_claim": {"claim_name": settings.artifacts_claim}},
        {"name": "checkpoints", "persistent_volume_claim": {"claim_name": settings.checkpoints_claim}},
        {
            "name": "training-data",
            "persistent_volume_claim": {"claim_name": settings.training_data_claim, "read_only": True},
        },
    ]
    mounts = [
        {"name": "tmp", "mount_path": TMP_PATH},
        {"name": "dagster-home", "mount_path": DAGSTER_HOME_PATH},
        {"name": "wandb", "mount_path": WANDB_ROOT},
        {"name": "cache", "mount_path": CACHE_ROOT},
        {"name": "artifacts", "mount_path": ARTIFACT_ROOT},
        {"name": "checkpoints", "mount_path": CHECKPOINT_ROOT},
        {"name": "training-data", "mount_path": TRAINING_DATA_ROOT, "read_only": True},
    ]
    return volumes, mounts


# torch sizes its intra-op (OpenMP) thread pool by the node's cores, not the pod's CPU limit: a 16-CPU pod on a
# 128-core node would start 128 threads and spend its quota being throttled. The downward API hands the
# container its limit, rounded up to whole CPUs; torchrun workers in one pod split it (launch.py), and TrainJob
# pods get their share per process (trainjob.py).
CPU_LIMIT_THREADS_ENV: dict[str, Any] = {
    "name": "OMP_NUM_THREADS",
    "value_from": {"resource_field_ref": {"resource": "limits.cpu", "divisor": "1"}},
}


def _step_env(settings: ExecutionSettings) -> list[dict[str, Any]]:
    # DAGSTER_HOME is set by dagster-k8s itself from the run launcher's dagster_home; don't set it twice.
    # No secrets here: this layer is shared by every step; each step's op tags add the secrets it needs.
    plain = {**WRITABLE_PATH_ENV, **READ_ONLY_PATH_ENV}
    plain.pop("DAGSTER_HOME")
    return [{"name": name, "value": value} for name, value in plain.items()]


def _secret_env(settings: ExecutionSettings, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Secret references (never values) for the variables ``names``, from the settings' Secret names."""
    known = {env_name: (secret, key) for env_name, secret, key in settings.secret_env}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown step secret(s) {unknown}; choose from {sorted(known)}")
    return [
        {"name": name, "value_from": {"secret_key_ref": {"name": known[name][0], "key": known[name][1]}}}
        for name in dict.fromkeys(names)
    ]


def secret_env_refs(settings: ExecutionSettings, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """``env`` entries referencing the Secrets of ``names`` (python-client form), for pods built outside op tags."""
    return _secret_env(settings, names)


def step_env(settings: ExecutionSettings) -> list[dict[str, Any]]:
    """Environment of every step pod (writable paths, read-only inputs, Secrets by reference), in
    python-client form. Also the environment of Kubeflow TrainJob pods (pixtrain_dagster/trainjob.py)."""
    return _step_env(settings)


@functools.cache
def _step_pod_tags_for(kind: StepKind, settings: ExecutionSettings, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    # The executor config sets the same contexts; repeating them in full here keeps every tagged step
    # hardened under any executor config, since a tag's security_context replaces the executor's.
    container: dict[str, Any] = {
        "security_context": dict(CONTAINER_SECURITY_CONTEXT),
        # /metrics and /healthz of the step (pixtrain_dagster.core.telemetry), scraped by the PodMonitor.
        "ports": [{"name": METRICS_PORT_NAME, "container_port": METRICS_PORT, "protocol": "TCP"}],
        "env": [{"name": "PIXTRAIN_METRICS_PORT", "value": str(METRICS_PORT)}, CPU_LIMIT_THREADS_ENV],
    }
    pod_spec: dict[str, Any] = {
        "security_context": dict(POD_SECURITY_CONTEXT),
        # Step pods never call the Kubernetes API: no token in the pod, nothing to steal.
        "automount_service_account_token": False,
    }
    if kind == "gpu":
        container["resources"] = _resources(settings.gpu_cpu, settings.gpu_memory, settings.gpu_count)
        container["env"].append({"name": "PYTORCH_CUDA_ALLOC_CONF", "value": settings.pytorch_cuda_alloc_conf})
        container["env"].append({"name": REQUIRE_GPU_ENV, "value": "1"})  # no silent fallback to the CPU
        container["volume_mounts"] = [{"name": "dshm", "mount_path": SHM_PATH}]
        # Memory-backed; counts against the pod's memory limit, so keep it well below gpu_memory.
        pod_spec["volumes"] = [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": settings.gpu_shm_size}}]
        pod_spec["node_selector"] = dict(settings.gpu_node_selector)
        pod_spec["tolerations"] = [{"key": settings.gpu_toleration_key, "operator": "Exists", "effect": "NoSchedule"}]
        if settings.gpu_priority_class.lower() != "none":
            pod_spec["priority_class_name"] = settings.gpu_priority_class
    elif kind == "cpu":
        # No GPU toleration: CPU steps can never land on (and block) a tainted GPU node.
        container["resources"] = _resources(settings.cpu_cpu, settings.cpu_memory)
    else:
        raise ValueError(f"step kind must be 'gpu' or 'cpu', not {kind!r}")
    if secrets:
        container["env"] = container.get("env", []) + _secret_env(settings, secrets)
    tags: dict[str, Any] = {
        K8S_CONFIG_TAG: {
            "container_config": container,
            "pod_spec_config": pod_spec,
            "pod_template_spec_metadata": {"labels": {"pixtrain/step-kind": kind, **METRICS_POD_LABELS}},
        }
    }
    if kind == "gpu":
        tags[GPU_TAG_KEY] = "true"
    return tags


def step_pod_tags(
    kind: StepKind, settings: ExecutionSettings | None = None, *, secrets: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Op tags giving a step its pod shape under the k8s executor, with only the ``secrets`` it needs.

    Use as ``@asset(op_tags=step_pod_tags("gpu", secrets=(WANDB_API_KEY_ENV,)))``. Locally only the
    ``pixtrain/gpu`` tag matters (the multiprocess executor runs one GPU step at a time). Returns a fresh copy,
    so callers may add tags.
    """
    return copy.deepcopy(_step_pod_tags_for(kind, settings or load_settings(), tuple(secrets)))


# ---- executors ---------------------------------------------------------------------------------------------


def _gpu_step_limit(settings: ExecutionSettings) -> list[dict[str, Any]]:
    return [{"key": GPU_TAG_KEY, "value": "true", "limit": settings.max_concurrent_gpu_steps}]


def k8s_executor_config(settings: ExecutionSettings | None = None) -> dict[str, Any]:
    """Run config of ``k8s_job_executor``: what every step pod shares. Op tags add the per-step shape."""
    settings = settings or load_settings()
    volumes, mounts = step_volumes(settings)
    config: dict[str, Any] = {
        "job_namespace": settings.namespace,
        "image_pull_policy": settings.image_pull_policy,
        "service_account_name": settings.step_service_account,
        "volumes": volumes,
        "volume_mounts": mounts,
        "security_context": dict(CONTAINER_SECURITY_CONTEXT),
        "tag_concurrency_limits": _gpu_step_limit(settings),
        "step_k8s_config": {
            "container_config": {"env": _step_env(settings)},
            "pod_spec_config": {
                "security_context": dict(POD_SECURITY_CONTEXT),
                "automount_service_account_token": False,
                "enable_service_links": False,  # no service env vars leaking cluster topology into steps
            },
        },
    }
    if settings.image:
        config["job_image"] = settings.image
    return config


# What a run may change in a step pod: its size and where it is placed. Nothing else: env would replace
# PIXTRAIN_GATE_* from the execution ConfigMap (loosening a gate), and accounts, images, commands and volumes
# are the deployment's security boundary.
RUN_OVERRIDABLE = {
    "container_config": {"resources"},
    "pod_spec_config": {"node_selector", "tolerations"},
}


def run_pod_overrides(per_step: Any) -> dict[str, Any]:
    """A run's ``per_step_k8s_config``, checked against RUN_OVERRIDABLE; raises naming the first refused key."""
    if not per_step:
        return {}
    if not isinstance(per_step, Mapping):
        raise ExecutionSettingsError("execution.config.per_step_k8s_config must map op names to pod settings")
    for op, config in per_step.items():
        for section, value in (config or {}).items():
            allowed = RUN_OVERRIDABLE.get(section, set())
            refused = sorted(set(value or {}) - allowed) if isinstance(value, Mapping) else [section]
            if section not in RUN_OVERRIDABLE or refused:
                raise ExecutionSettingsError(
                    f"execution.config.per_step_k8s_config.{op}.{section}"
                    + (f".{refused[0]}" if section in RUN_OVERRIDABLE else "")
                    + " cannot be set by a run: a run may only change container_config.resources and "
                    "pod_spec_config.node_selector / tolerations; the rest is the deployment's (docs/scale-out.md)"
                )
    return {op: dict(config or {}) for op, config in per_step.items()}


def executor_from_env(environ: Mapping[str, str] | None = None) -> ExecutorDefinition:
    """The executor named by PIXTRAIN_EXECUTOR: in_process, multiprocess (default) or k8s."""
    env = os.environ if environ is None else environ
    raw = env.get(EXECUTOR_ENV_VAR, "").strip()
    choice = (raw or "multiprocess").lower().replace("-", "_")
    if choice == "in_process":
        return in_process_executor
    if choice == "multiprocess":
        # One GPU step at a time on a workstation, whatever the CPU count allows for data steps.
        settings = _settings_for(environ)
        return multiprocess_executor.configured({"tag_concurrency_limits": _gpu_step_limit(settings)})
    if choice == "k8s":
        from .k8s_executor import run_sized_k8s_executor  # only here: importing dagster_k8s costs ~1.6 s

        settings = _settings_for(environ)
        deployment = k8s_executor_config(settings)

        def with_run_overrides(run_config: dict[str, Any]) -> dict[str, Any]:
            # Everything comes from the deployment; a run may only resize a step's pod (run_pod_overrides).
            return {**deployment, "per_step_k8s_config": run_pod_overrides(run_config.get("per_step_k8s_config"))}

        return run_sized_k8s_executor(settings).configured(
            with_run_overrides,
            config_schema={
                "per_step_k8s_config": Field(
                    Permissive(),
                    is_required=False,
                    default_value={},
                    description="{op name: dagster-k8s/config} merged last into that step's pod (docs/scale-out.md).",
                ),
            },
        )
    raise ExecutionSettingsError(
        f"{EXECUTOR_ENV_VAR}={raw!r} is not a known executor; use one of: {', '.join(EXECUTOR_CHOICES)}"
    )
