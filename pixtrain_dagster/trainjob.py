"""Multi-node training on Kubernetes: the Kubeflow Trainer v2 ``TrainJob`` that the ``lora_training`` step
creates when ``num_nodes > 1``, and the launcher that creates it, follows it and cleans it up.

Plain Python: this module imports neither dagster-k8s nor the Kubernetes client at import time (the launcher
takes the API objects as arguments; ``pixtrain_dagster.trainjob_step`` builds them in the cluster). It reuses
the step-pod definitions of ``pixtrain_dagster.execution`` (uid, volumes, writable-path environment, security
contexts, Secrets by reference, GPU node selector and toleration) so a TrainJob pod is shaped exactly like a
single-node GPU step pod.

Kubeflow Trainer v2.3 (``trainer.kubeflow.org/v1alpha1``) lets a TrainJob set only some things directly
(``spec.trainer``: image, command, env, numNodes, numProcPerNode, resourcesPerNode); pod-level settings go
through ``spec.runtimePatches[].trainingRuntimeSpec``, which accepts, for the pod: securityContext,
nodeSelector, tolerations, volumes, serviceAccountName, affinity, schedulingGates, imagePullSecrets and
terminationGracePeriodSeconds, and for a container: env, securityContext and volumeMounts. Pod fields outside
that list (automountServiceAccountToken, enableServiceLinks, priorityClassName) cannot be patched from a
TrainJob; see docs/scale-out.md for how they are covered (service account without a token, runtime).

The torch runtime (ClusterTrainingRuntime ``torch-distributed``) injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` (``<name>-node-0-0.<name>``) and ``PET_MASTER_PORT`` (29500) into the
``node`` container; ``torchrun`` reads them, so the command is ``torchrun -m pixtrain_dagster.core.distributed``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .core.backoff import Backoff
from .core.settings import REQUIRE_GPU_ENV
from .execution import (
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    SHM_PATH,
    WANDB_API_KEY_ENV,
    ExecutionSettings,
    ExecutionSettingsError,
    secret_env_refs,
    step_env,
    step_volumes,
)

# ---- the Kubeflow Trainer API ---------------------------------------------------------------------------------

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
TRAINJOB_API_VERSION = f"{TRAINER_GROUP}/{TRAINER_VERSION}"
# Written and tested (tests/k8s/test_k8s_trainjob.py) against Kubeflow Trainer v2.3.0.
DEFAULT_RUNTIME = "torch-distributed"  # ClusterTrainingRuntime installed with Kubeflow Trainer
# The torch runtime's replicated job and its trainer container are both called "node".
REPLICATED_JOB = "node"
TRAINER_CONTAINER = "node"
RENDEZVOUS_PORT = 29500  # PET_MASTER_PORT the torch runtime injects (c10d TCPStore on rank 0)
PATCH_MANAGER = "pixtrain.dagster/lora-training"  # owner of our runtimePatches entry
ENTRYPOINT = ("torchrun", "-m", "pixtrain_dagster.core.distributed")

# Labels JobSet puts on every pod it creates; the TrainJob's JobSet has the TrainJob's name.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # = PET_NODE_RANK
# Our labels: the NetworkPolicy of k8s/pixtrain-infra (templates/networkpolicy-trainjob.yaml) selects
# TRAINJOB_POD_LABEL; TRAINJOB_NAME_LABEL tells the pods of one TrainJob apart.
TRAINJOB_POD_LABEL = "pixtrain/trainjob-worker"
TRAINJOB_NAME_LABEL = "pixtrain/trainjob"
# The step pod that launches a TrainJob: labelled for kube-API egress (networkpolicy-trainjob.yaml).
LAUNCHER_POD_LABELS: Mapping[str, str] = {"pixtrain/trainjob-launcher": "true"}
DEFAULT_LAUNCHER_SERVICE_ACCOUNT = "pixtrain-trainjob-launcher"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"  # read by the Trainer's volcano plugin

# JobSet names its pods <trainjob>-node-<job index>-<pod index>-<5 chars>; keep the whole under 63.
MAX_NAME_LENGTH = 40
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class TrainJobSettingsError(ValueError):
    """A TrainJob setting cannot work; the message names it and what to do."""


@dataclass(frozen=True)
class TrainJobSettings:
    """Cluster-side TrainJob settings, read from PIXTRAIN_TRAINJOB_* (ConfigMap pixtrain-trainjob-env)."""

    runtime: str = DEFAULT_RUNTIME
    runtime_kind: str = "ClusterTrainingRuntime"
    # Kueue LocalQueue for gang admission of all nodes at once; "" = no Kueue label.
    kueue_queue: str = ""
    # Volcano queue (the runtime must have podGroupPolicy.volcano); "" = Volcano's default queue.
    volcano_queue: str = ""
    # Service account of the step pod that creates the TrainJob (bound to the TrainJob Role, token mounted).
    launcher_service_account: str = DEFAULT_LAUNCHER_SERVICE_ACCOUNT

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TrainJobSettings:
        def get(name: str, default: str) -> str:
            return environ.get(name, "").strip() or default

        kind = get("PIXTRAIN_TRAINJOB_RUNTIME_KIND", "ClusterTrainingRuntime")
        if kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            raise TrainJobSettingsError(
                f"PIXTRAIN_TRAINJOB_RUNTIME_KIND={kind!r}: use ClusterTrainingRuntime or TrainingRuntime"
            )
        return cls(
            runtime=get("PIXTRAIN_TRAINJOB_RUNTIME", DEFAULT_RUNTIME),
            runtime_kind=kind,
            kueue_queue=get("PIXTRAIN_TRAINJOB_KUEUE_QUEUE", ""),
            volcano_queue=get("PIXTRAIN_TRAINJOB_VOLCANO_QUEUE", ""),
            launcher_service_account=get(
                "PIXTRAIN_TRAINJOB_LAUNCHER_SERVICE_ACCOUNT", DEFAULT_LAUNCHER_SERVICE_ACCOUNT
            ),
        )


def trainjob_launcher_k8s_config(
    settings: ExecutionSettings, trainjob_settings: TrainJobSettings | None = None
) -> dict[str, Any]:
    """``dagster-k8s/config`` for the lora_training step pod of a multi-node run (python-client form).

    That pod only writes the request, follows the TrainJob and publishes the outputs: it needs an API token
    (the launcher service account, bound only to the TrainJob Role), the label that opens kube-API egress,
    and no GPU (the training runs in the TrainJob's pods). ``merge_behavior: SHALLOW`` makes each key here
    replace the GPU step tag's value instead of deep-merging into it (a deep merge would keep
    ``nvidia.com/gpu``); the k8s executor applies it to runs with ``num_nodes > 1`` (k8s_executor.py). Keys not
    named here (security contexts, volumes, env, the executor's settings) keep their step values.
    """
    ts = trainjob_settings or TrainJobSettings()
    amounts = {"cpu": settings.cpu_cpu, "memory": settings.cpu_memory}
    return {
        "container_config": {"resources": {"requests": dict(amounts), "limits": dict(amounts)}},
        "pod_spec_config": {
            "service_account_name": ts.launcher_service_account,
            "automount_service_account_token": True,
            "node_selector": {},  # no GPU, so no reason to take room on a GPU node
            "tolerations": [],
        },
        "pod_template_spec_metadata": {"labels": {"pixtrain/step-kind": "cpu", **LAUNCHER_POD_LABELS}},
        "merge_behavior": "SHALLOW",
    }


def trainjob_name(run_id: str, step_key: str, attempt: int = 0) -> str:
    """A DNS-safe name, stable for one attempt of one step of one run.

    Each retry gets its own name, so it never adopts the failed TrainJob of the attempt before while that
    one is still being deleted; a create whose answer was lost is adopted by name (409 AlreadyExists).
    """
    digest = hashlib.sha256(f"{run_id}/{step_key}/{attempt}".encode()).hexdigest()[:10]
    prefix = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "run"
    return f"pixtrain-{prefix}-{digest}"


# ---- API-form conversion ------------------------------------------------------------------------------------

# Keys whose values are maps with user-chosen keys (label keys, resource names): convert the key, not inside.
_FREE_FORM_MAPS = {"node_selector", "labels", "annotations", "limits", "requests"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def to_api_form(value: Any, _free_form: bool = False) -> Any:
    """Python-client field names (execution.py's form) -> Kubernetes API form (camelCase)."""
    if isinstance(value, Mapping):
        if _free_form:
            return {k: to_api_form(v) for k, v in value.items()}
        return {_camel(k): to_api_form(v, k in _FREE_FORM_MAPS) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_api_form(v) for v in value]
    return value


# ---- the manifest -------------------------------------------------------------------------------------------


def build_trainjob(
    *,
    name: str,
    request_uri: str,
    num_nodes: int,
    gpus_per_node: int,
    image: str,
    settings: ExecutionSettings,
    trainjob_settings: TrainJobSettings | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob (API form, ready for CustomObjectsApi) that trains on ``num_nodes`` x ``gpus_per_node`` GPUs.

    Every pod is the single-node GPU step pod spread over nodes: same image, uid 1001 with the same hardened
    pod and container security contexts, the same volumes and writable-path environment, Secrets by
    reference, the GPU node selector and toleration, and ``nvidia.com/gpu = gpus_per_node``. ``request_uri``
    is the training request JSON on storage every pod mounts (the artifacts PVC); rank 0 writes the result
    next to it.
    """
    ts = trainjob_settings or TrainJobSettings()
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise TrainJobSettingsError(
            f"TrainJob name {name!r} must be a DNS label of at most {MAX_NAME_LENGTH} characters "
            "(lower-case letters, digits, '-'), since JobSet derives pod and Service names from it"
        )
    if num_nodes < 2:
        raise TrainJobSettingsError(
            f"num_nodes={num_nodes}: a TrainJob is for 2 or more nodes; one node trains inside the step pod"
        )
    if gpus_per_node < 1:
        raise TrainJobSettingsError(f"devices={gpus_per_node}: a TrainJob node needs at least one GPU")
    if not image:
        raise ExecutionSettingsError(
            "the TrainJob needs the step image: set PIXTRAIN_IMAGE or pass the image of the running step pod"
        )

    from kubernetes.utils import parse_quantity  # dagster-k8s's dependency; only where a TrainJob is built

    volumes, mounts = step_volumes(settings)
    volumes = [*volumes, {"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": settings.gpu_shm_size}}]
    mounts = [*mounts, {"name": "dshm", "mount_path": SHM_PATH}]
    # The training processes log to W&B; they never touch the metadata database (the launching step does), so
    # they get the W&B key and nothing else (least privilege, as the step pods).
    env = [
        *step_env(settings),
        {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": settings.pytorch_cuda_alloc_conf},
        {"name": REQUIRE_GPU_ENV, "value": "1"},  # no silent fallback to the CPU
        # The node's CPUs split between its training processes (the step pod's downward-API value would give
        # each process the whole node's share), and torchrun does not print its one-thread banner.
        {"name": "OMP_NUM_THREADS", "value": str(max(1, math.ceil(parse_quantity(settings.gpu_cpu)) // gpus_per_node))},
        *secret_env_refs(settings, (WANDB_API_KEY_ENV,)),
    ]
    amounts = {"cpu": settings.gpu_cpu, "memory": settings.gpu_memory, "nvidia.com/gpu": str(gpus_per_node)}

    pod_labels = {TRAINJOB_POD_LABEL: "true", TRAINJOB_NAME_LABEL: name, "pixtrain/step-kind": "gpu"}
    pod_spec_patch = {
        "service_account_name": settings.step_service_account,  # automountServiceAccountToken: false
        "security_context": dict(POD_SECURITY_CONTEXT),
        "node_selector": dict(settings.gpu_node_selector),
        "tolerations": [{"key": settings.gpu_toleration_key, "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": volumes,
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "security_context": dict(CONTAINER_SECURITY_CONTEXT),
                "volume_mounts": mounts,
            }
        ],
    }
    metadata_labels = {
        "app.kubernetes.io/name": "pixtrain",
        "app.kubernetes.io/component": "trainjob",
        TRAINJOB_NAME_LABEL: name,
        **(labels or {}),
    }
    metadata: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": metadata_labels}
    if ts.kueue_queue:
        metadata_labels[KUEUE_QUEUE_LABEL] = ts.kueue_queue
    if ts.volcano_queue:
        metadata["annotations"] = {VOLCANO_QUEUE_ANNOTATION: ts.volcano_queue}

    manifest = {
        "api_version": TRAINJOB_API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtime_ref": {"name": ts.runtime, "api_group": TRAINER_GROUP, "kind": ts.runtime_kind},
            "trainer": {
                "image": image,
                "command": [*ENTRYPOINT, "--request", request_uri],
                "env": env,
                "num_nodes": num_nodes,
                "num_proc_per_node": gpus_per_node,
                "resources_per_node": {"requests": dict(amounts), "limits": dict(amounts)},
            },
            "runtime_patches": [
                {
                    "manager": PATCH_MANAGER,
                    "training_runtime_spec": {
                        "template": {
                            "spec": {
                                "replicated_jobs": [
                                    {
                                        "name": REPLICATED_JOB,
                                        "template": {
                                            "spec": {
                                                "template": {
                                                    "metadata": {"labels": pod_labels},
                                                    "spec": pod_spec_patch,
                                                }
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }
    return to_api_form(manifest)


def trainjob_pod_spec(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The pod spec a TrainJob's node pods end up with (API form): the runtime patch plus spec.trainer.

    What the Trainer controller merges into the runtime's ``node`` container; used by the tests to run the
    pod-level checks (Pod Security "restricted", kubernetes-validate) on what the cluster will run.
    """
    spec = manifest["spec"]
    trainer = spec["trainer"]
    patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = dict(patch["template"]["spec"]["template"]["spec"])
    container_patch = pod.pop("containers")[0]
    container = {
        "name": TRAINER_CONTAINER,
        "image": trainer["image"],
        "command": list(trainer["command"]),
        "env": list(trainer["env"]),
        "resources": trainer["resourcesPerNode"],
        "ports": [{"containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        **{k: v for k, v in container_patch.items() if k != "name"},
    }
    return {**pod, "containers": [container]}


# ---- the launcher -------------------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    CREATED = "created"
    PENDING = "pending"  # waiting for admission (Kueue), scheduling or image pulls
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


TERMINAL = {Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED, Phase.TIMED_OUT}


@dataclass(frozen=True)
class PodProblem:
    """Why a training pod failed or cannot start, read from its status."""

    pod: str
    reason: str  # OOMKilled, Error, ImagePullBackOff, Evicted, NodeLost, ...
    message: str = ""
    container: str = ""
    exit_code: int | None = None
    node: str = ""

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" container {self.container}" if self.container else "")
        where += f" on node {self.node}" if self.node else ""
        code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
        return f"{where}: {self.reason}{code}" + (f": {self.message}" if self.message else "")


@dataclass
class TrainJobOutcome:
    name: str
    phase: Phase
    message: str = ""
    problems: list[PodProblem] = field(default_factory=list)
    transitions: list[Phase] = field(default_factory=list)
    deleted: bool = False
    log_lines: int = 0

    @property
    def succeeded(self) -> bool:
        return self.phase is Phase.SUCCEEDED


class TrainJobError(RuntimeError):
    """The Kubernetes API refused or kept failing a call; the message names the call and the status."""


class CustomObjectsApi(Protocol):  # the subset of kubernetes.client.CustomObjectsApi the launcher uses
    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs): ...
    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs): ...
    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs): ...


class CoreV1Api(Protocol):  # the subset of kubernetes.client.CoreV1Api the launcher uses
    def list_namespaced_pod(self, namespace, **kwargs): ...
    def read_namespaced_pod_log(self, name, namespace, **kwargs): ...


@dataclass(frozen=True)
class KubeApis:
    custom: CustomObjectsApi
    core: CoreV1Api


# Transient Kubernetes API failures (429, 5xx, connection errors); 4xx answers are never retried.
TRANSIENT_API_ERRORS = Backoff(max_attempts=5, initial_delay_s=1.0, max_delay_s=30.0)


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: 429, 5xx, connection reset/refused, timeouts, dropped connections."""
    status = _status_of(error)
    if status:
        return status == 429 or status >= 500
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    # urllib3's ProtocolError / MaxRetryError / NewConnectionError, without importing urllib3 here.
    return type(error).__module__.split(".")[0] == "urllib3"


class Launcher:
    """Creates one TrainJob, follows it to a terminal phase and cleans up. See ``run_trainjob``."""

    def __init__(
        self,
        api: KubeApis,
        manifest: Mapping[str, Any],
        namespace: str,
        log: logging.Logger | Any,
        *,
        poll_seconds: float = 10.0,
        timeout_s: float | None = None,
        should_cancel: Callable[[], bool] = lambda: False,
        retry: Backoff = TRANSIENT_API_ERRORS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.manifest, self.namespace, self.log = api, manifest, namespace, log
        self.name = manifest["metadata"]["name"]
        self.poll_seconds, self.timeout_s, self.should_cancel = poll_seconds, timeout_s, should_cancel
        self.retry, self.sleep, self.clock = retry, sleep, clock
        self.outcome = TrainJobOutcome(self.name, Phase.CREATED)
        self._warned: set[tuple[str, str]] = set()
        self._log_pod: str | None = None
        self._log_after: tuple[str, int] | None = None  # timestamp of the last rank-0 log line streamed
        self._log_read_at = 0.0

    # -- API calls with bounded retries --

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delays = self.retry.delays()
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - classified below
                status = _status_of(error)
                if not is_transient(error):
                    if status is None:
                        raise  # not an API answer (a bug, a bad argument): keep its own type and traceback
                    body = getattr(error, "body", "") or error
                    raise TrainJobError(f"{what} {self.name}: Kubernetes API answered {status}: {body}") from error
                delay = next(delays, None)
                if delay is None:
                    raise TrainJobError(
                        f"{what} {self.name}: still failing after {attempt} attempts "
                        f"(last: {status or type(error).__name__}: {error})"
                    ) from error
                self.log.warning(
                    f"{what} {self.name}: transient API error ({status or type(error).__name__}); "
                    f"retry {attempt}/{self.retry.max_attempts - 1} in {delay:.0f}s"
                )
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _transition(self, phase: Phase, message: str = "") -> None:
        if phase is not self.outcome.phase or not self.outcome.transitions:
            self.outcome.transitions.append(phase)
            self.log.info(f"TrainJob {self.name}: {phase.value}" + (f" ({message})" if message else ""))
        self.outcome.phase, self.outcome.message = phase, message or self.outcome.message

    # -- the state machine --

    def run(self) -> TrainJobOutcome:
        try:
            self._create()
            deadline = None if self.timeout_s is None else self.clock() + self.timeout_s
            while self.outcome.phase not in TERMINAL:
                if self.should_cancel():
                    self._transition(Phase.CANCELLED, "the Dagster run is being terminated")
                    break
                self._observe()
                if self.outcome.phase in TERMINAL:
                    break
                if deadline is not None and self.clock() >= deadline:
                    self._transition(Phase.TIMED_OUT, f"not finished after {self.timeout_s:.0f}s")
                    break
                self.sleep(self.poll_seconds)
        except BaseException:
            # Run terminated (Dagster interrupts the step), API gave up, or a bug: never leave 16 GPUs busy.
            self._delete_quietly()
            raise
        if self.outcome.phase is not Phase.SUCCEEDED:
            self._delete_quietly()
        return self.outcome

    def _create(self) -> None:
        try:
            self._call(
                "create TrainJob",
                self.api.custom.create_namespaced_custom_object,
                TRAINER_GROUP,
                TRAINER_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                dict(self.manifest),
            )
        except TrainJobError as error:
            if _status_of(error.__cause__ or error) != 409:
                raise
            # 409 AlreadyExists: a create whose answer was lost (connection reset) did succeed, or this is a
            # retry of the step: adopt the TrainJob of the same name (the name is per run and step).
            self.log.info(f"TrainJob {self.name} already exists; following it")
        self._transition(Phase.CREATED, f"{self.manifest['spec']['trainer']['numNodes']} nodes")

    def _get(self) -> dict[str, Any]:
        return self._call(
            "get TrainJob",
            self.api.custom.get_namespaced_custom_object,
            TRAINER_GROUP,
            TRAINER_VERSION,
            self.namespace,
            TRAINJOB_PLURAL,
            self.name,
        )

    def _pods(self) -> list[Any]:
        result = self._call(
            "list pods of TrainJob",
            self.api.core.list_namespaced_pod,
            self.namespace,
            label_selector=f"{JOBSET_NAME_LABEL}={self.name}",
        )
        return list(_field(result, "items") or [])

    def _observe(self) -> None:
        trainjob = self._get()
        conditions = {c.get("type"): c for c in (trainjob.get("status") or {}).get("conditions") or []}
        pods = self._pods()
        self._stream_rank0_logs(pods)
        problems = [p for pod in pods for p in pod_problems(pod)]
        for problem in problems:
            key = (problem.pod, problem.reason)
            if key not in self._warned:
                self._warned.add(key)
                self.log.warning(f"TrainJob {self.name}: {problem.describe()}")
        failed, complete = conditions.get("Failed"), conditions.get("Complete")
        if complete and complete.get("status") == "True":
            self._stream_rank0_logs(pods)
            self._transition(Phase.SUCCEEDED, complete.get("message", ""))
        elif failed and failed.get("status") == "True":
            self.outcome.problems = problems
            reasons = "; ".join(p.describe() for p in problems) or "no pod reported a reason"
            self._transition(Phase.FAILED, f"{failed.get('reason', 'Failed')}: {failed.get('message', '')} [{reasons}]")
        elif any(_field(_field(pod, "status"), "phase") == "Running" for pod in pods):
            self._transition(Phase.RUNNING, f"{len(pods)} pods")
        else:
            suspended = conditions.get("Suspended")
            why = (
                "waiting for admission (suspended)"
                if suspended and suspended.get("status") == "True"
                else ("waiting for pods to be scheduled and started")
            )
            self._transition(Phase.PENDING, why)

    def _stream_rank0_logs(self, pods: Iterable[Any]) -> None:
        rank0 = [
            p
            for p in pods
            if (_labels(p).get(COMPLETION_INDEX_LABEL) == "0")
            and _field(_field(p, "status"), "phase") in ("Running", "Succeeded", "Failed")
        ]
        if not rank0:
            return
        pod_name = _field(_field(rank0[-1], "metadata"), "name")
        if pod_name != self._log_pod:  # a restarted rank 0 is a new pod: stream it from its start
            self._log_pod, self._log_after = pod_name, None
        window = {}
        if self._log_after is not None:
            # Everything since the last read, with a margin; the overlap is dropped by timestamp below.
            window = {"since_seconds": int(self.clock() - self._log_read_at + self.poll_seconds) + 5}
        try:
            text = self._call(
                "read rank-0 log of TrainJob",
                self.api.core.read_namespaced_pod_log,
                pod_name,
                self.namespace,
                container=TRAINER_CONTAINER,
                timestamps=True,
                **window,
            )
        except TrainJobError as error:
            self.log.warning(f"could not read the rank-0 log: {error}")
            return
        self._log_read_at = self.clock()
        for line in (text or "").splitlines():
            stamp, _, message = line.partition(" ")
            key = log_stamp_key(stamp)
            if self._log_after is not None and key <= self._log_after:
                continue  # overlap with the previous read
            self._log_after = key
            self.outcome.log_lines += 1
            self.log.info(f"[rank 0] {message}")

    def _delete_quietly(self) -> None:
        try:
            self._call(
                "delete TrainJob",
                self.api.custom.delete_namespaced_custom_object,
                TRAINER_GROUP,
                TRAINER_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                self.name,
                propagation_policy="Foreground",
            )
            self.outcome.deleted = True
            self.log.info(f"TrainJob {self.name} deleted")
        except TrainJobError as error:
            if _status_of(error.__cause__ or error) == 404:
                self.outcome.deleted = True
                return
            self.log.error(
                f"could not delete TrainJob {self.name}; delete it by hand "
                f"(kubectl -n {self.namespace} delete trainjob {self.name}): {error}"
            )


def run_trainjob(
    api: KubeApis,
    manifest: Mapping[str, Any],
    namespace: str,
    log: logging.Logger | Any,
    *,
    poll_seconds: float = 10.0,
    timeout_s: float | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    retry: Backoff = TRANSIENT_API_ERRORS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TrainJobOutcome:
    """Create the TrainJob ``manifest``, follow it and return how it ended.

    created -> pending -> running -> succeeded | failed | cancelled | timed_out. Rank-0 logs go to ``log``
    as they come; pod problems (OOMKilled, ImagePullBackOff, Evicted, NodeLost, ...) are logged once each
    and returned in ``outcome.problems`` on failure. The TrainJob is deleted unless it succeeded, and also
    when this function is interrupted (Dagster run terminated: the step process is interrupted) or raises.
    API calls are retried on 429/5xx/connection errors up to ``retry.max_attempts`` times; a 4xx (e.g. the
    admission webhook rejecting the manifest) raises ``TrainJobError`` at once.
    """
    return Launcher(
        api,
        manifest,
        namespace,
        log,
        poll_seconds=poll_seconds,
        timeout_s=timeout_s,
        should_cancel=should_cancel,
        retry=retry,
        sleep=sleep,
        clock=clock,
    ).run()


# ---- reading pod status (works on kubernetes-client models and on plain dicts) ------------------------------


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name, obj.get(_camel(name)))
    return getattr(obj, name, None)


def _labels(pod: Any) -> Mapping[str, str]:
    return _field(_field(pod, "metadata"), "labels") or {}


_WAITING_PROBLEMS = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


def pod_problems(pod: Any) -> list[PodProblem]:
    """Failures and stuck states of one pod: evictions, lost nodes, OOM kills, non-zero exits, image pulls."""
    name = _field(_field(pod, "metadata"), "name") or "?"
    status = _field(pod, "status") or {}
    node = _field(_field(pod, "spec"), "node_name") or ""
    found: list[PodProblem] = []
    reason = _field(status, "reason")
    if reason in ("Evicted", "NodeLost", "Preempting", "NodeAffinity", "OutOfcpu", "OutOfmemory"):
        found.append(PodProblem(name, reason, _field(status, "message") or "", node=node))
    for condition in _field(status, "conditions") or []:
        if _field(condition, "type") == "DisruptionTarget" and _field(condition, "status") == "True":
            found.append(
                PodProblem(
                    name, _field(condition, "reason") or "Disrupted", _field(condition, "message") or "", node=node
                )
            )
    if _field(status, "phase") == "Unknown" and not reason:
        found.append(PodProblem(name, "NodeLost", "pod status unknown: its node stopped reporting", node=node))
    for cs in [*(_field(status, "init_container_statuses") or []), *(_field(status, "container_statuses") or [])]:
        cname = _field(cs, "name") or ""
        state = _field(cs, "state") or {}
        waiting, terminated = _field(state, "waiting"), _field(state, "terminated")
        if waiting and _field(waiting, "reason") in _WAITING_PROBLEMS:
            found.append(
                PodProblem(name, _field(waiting, "reason"), _field(waiting, "message") or "", cname, None, node)
            )
        if terminated and (_field(terminated, "exit_code") or 0) != 0:
            found.append(
                PodProblem(
                    name,
                    _field(terminated, "reason") or "Error",
                    _field(terminated, "message") or "",
                    cname,
                    _field(terminated, "exit_code"),
                    node,
                )
            )
    return found


def log_stamp_key(stamp: str) -> tuple[str, int]:
    """Sort key of a kubelet log timestamp (RFC 3339 with 0-9 fraction digits, trailing zeros trimmed)."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    digits = frac if frac.isdigit() else ""
    return whole, int(digits.ljust(9, "0")[:9] or 0)
