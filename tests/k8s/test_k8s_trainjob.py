"""The Kubeflow TrainJob that multi-node training creates (pixtrain_dagster/trainjob.py), checked offline:
against the TrainJob schema of Kubeflow Trainer v2.3.0, the Pod Security "restricted" profile, strict
Kubernetes schemas for the pods it becomes, and against the single-node GPU step pod it must resemble."""

from __future__ import annotations

import copy
import json

import pytest

from pixtrain_dagster.execution import K8S_CONFIG_TAG, ExecutionSettings, step_pod_tags
from pixtrain_dagster.trainjob import (
    KUEUE_QUEUE_LABEL,
    RENDEZVOUS_PORT,
    TRAINJOB_POD_LABEL,
    TrainJobSettings,
    TrainJobSettingsError,
    build_trainjob,
    trainjob_launcher_k8s_config,
    trainjob_name,
    trainjob_pod_spec,
)

from . import trainjob_schema
from .k8s_support import SECRET_CANARIES, api_dict, validate_strict
from .pod_security import violations

IMAGE = "registry.example.com/pixtrain:1.2.3"
REQUEST = "/data/artifacts/runs/4f0c2a9e/lora_training/request.json"


def _manifest(environ=None, **kwargs):
    settings = ExecutionSettings.from_env(environ or {})
    args = dict(
        name=trainjob_name("4f0c2a9e-5b1d", "lora_training"),
        request_uri=REQUEST,
        num_nodes=2,
        gpus_per_node=8,
        image=IMAGE,
        settings=settings,
    )
    return build_trainjob(**{**args, **kwargs})


def _schemas():
    yield pytest.param(trainjob_schema.api_models_schema, id="api-models")
    path = trainjob_schema.crd_path()
    yield pytest.param(
        (lambda: trainjob_schema.crd_schema(path)) if path else None,
        id="crd",
        marks=pytest.mark.skipif(
            path is None,
            reason="no copy of the v2.3.0 TrainJob CRD found: set "
            "PIXTRAIN_TRAINJOB_CRD or put it in shared/crds/ (see trainjob_schema.py)",
        ),
    )


# The node pods' spec inside a TrainJob's runtime patch.
_POD_SPEC = (
    "spec",
    "runtimePatches",
    0,
    "trainingRuntimeSpec",
    "template",
    "spec",
    "replicatedJobs",
    0,
    "template",
    "spec",
    "template",
    "spec",
)


@pytest.mark.parametrize("schema", _schemas())
def test_two_nodes_by_eight_gpus_matches_the_trainjob_schema(schema):
    assert trainjob_schema.errors(_manifest(), schema()) == []


@pytest.mark.parametrize("schema", _schemas())
@pytest.mark.parametrize(
    "path, bad",
    [
        (("spec", "trainer"), {"numNode": 2}),  # typo of numNodes
        (("spec", "trainer"), {"numNodes": "2"}),  # wrong type
        (
            _POD_SPEC + ("containers", 0, "securityContext"),
            {"readOnlyRootFileSystem": True},
        ),
        # priorityClassName cannot be patched from a TrainJob in v2.3 (see docs/scale-out.md)
        (
            _POD_SPEC,
            {"priorityClassName": "pixtrain-training"},
        ),
    ],
)
def test_the_schema_check_catches_unknown_and_mistyped_fields(schema, path, bad):
    manifest = copy.deepcopy(_manifest())
    node = manifest
    for key in path:
        node = node[key]
    node.update(bad)
    assert trainjob_schema.errors(manifest, schema()), f"{bad} at {path} was accepted"


def test_the_trainjob_runs_the_distributed_entry_point_on_the_torch_runtime():
    manifest = _manifest()
    spec = manifest["spec"]
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    trainer = spec["trainer"]
    # torchrun reads PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT,
    # which the torch runtime injects into this container.
    assert trainer["command"] == ["torchrun", "-m", "pixtrain_dagster.core.distributed", "--request", REQUEST]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8 and trainer["image"] == IMAGE
    amounts = trainer["resourcesPerNode"]
    assert amounts["limits"]["nvidia.com/gpu"] == amounts["requests"]["nvidia.com/gpu"] == "8"
    assert not any(e["name"].startswith("PET_") for e in trainer["env"])  # the runtime owns those


def test_trainjob_pods_pass_pod_security_restricted():
    pod = trainjob_pod_spec(_manifest())
    assert violations(pod) == []
    # The checker does look at what we pass it: the same pod without the patch's contexts fails.
    bare = {k: v for k, v in pod.items() if k != "securityContext"}
    bare["containers"] = [{k: v for k, v in c.items() if k != "securityContext"} for c in pod["containers"]]
    assert violations(bare)


def test_trainjob_pod_parts_validate_strict_as_pod_and_job():
    """kubernetes-validate --strict knows no CRDs: validate the pod the TrainJob becomes, as a Pod and as the
    batch/v1 Job template JobSet creates for each replicated job."""
    manifest = _manifest()
    pod_spec = trainjob_pod_spec(manifest)
    name = manifest["metadata"]["name"]
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    labels = patch["template"]["spec"]["template"]["metadata"]["labels"]
    validate_strict(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-node-0-0-abcde", "labels": labels},
            "spec": pod_spec,
        }
    )
    validate_strict(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"{name}-node-0"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {"metadata": {"labels": labels}, "spec": {**pod_spec, "restartPolicy": "Never"}},
            },
        }
    )


def test_trainjob_pods_are_shaped_like_the_single_node_gpu_step_pod(k8s_step_jobs):
    step = api_dict(k8s_step_jobs["lora_training"][0])["spec"]["template"]["spec"]
    (step_container,) = step["containers"]
    # The step Jobs are built with the default PIXTRAIN_GPU_COUNT (1): compare with one GPU per node.
    pod = trainjob_pod_spec(_manifest(gpus_per_node=ExecutionSettings.from_env({}).gpu_count))
    (container,) = pod["containers"]

    assert pod["securityContext"] == step["securityContext"]
    assert container["securityContext"] == step_container["securityContext"]
    assert pod["serviceAccountName"] == step["serviceAccountName"]  # pixtrain-step: no API token
    assert pod["nodeSelector"] == step["nodeSelector"] and pod["tolerations"] == step["tolerations"]
    assert container["resources"] == step_container["resources"]

    def volumes(spec):
        return {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in spec["volumes"]}

    # The same volumes, except the metadata database's CA: training pods never talk to the database (the
    # launching step records the run), so they get neither its CA nor its password.
    database_only_volumes = {"db-ca"}
    assert volumes(pod) == {k: v for k, v in volumes(step).items() if k not in database_only_volumes}
    assert {m["mountPath"]: m for m in container["volumeMounts"]} == {
        m["mountPath"]: m for m in step_container["volumeMounts"] if m["name"] not in database_only_volumes
    }

    # Same variables and Secret references, except what dagster-k8s itself adds for Dagster's own processes
    # (the training processes run no Dagster code), the step's metrics port (the step pod serves /metrics), the
    # database password, and the PIXTRAIN_* ConfigMap, loaded with envFrom in step pods (a TrainJob container
    # has no envFrom; the request file carries the settings).
    step_env = {e["name"]: e for e in step_container["env"]}
    env = {e["name"]: e for e in container["env"]}
    dagster_only = {n for n in step_env if n.startswith("DAGSTER_")}
    assert set(env) == set(step_env) - dagster_only - {"PIXTRAIN_DB_PASSWORD", "PIXTRAIN_METRICS_PORT"}
    # OpenMP threads: the step pod's whole CPU limit (one process); a TrainJob node's share per process.
    per_process = {"OMP_NUM_THREADS"}
    assert all(env[n] == step_env[n] for n in env if n not in per_process)
    assert step_env["OMP_NUM_THREADS"]["valueFrom"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": container["resources"]["limits"]["cpu"]}


@pytest.mark.parametrize(
    ("gpu_cpu", "gpus_per_node", "threads"),
    [("16", 8, "2"), ("16", 2, "8"), ("48", 8, "6"), ("12500m", 4, "3"), ("4", 8, "1"), ("1", 2, "1")],
)
def test_each_training_process_gets_its_share_of_the_node_cpus(gpu_cpu, gpus_per_node, threads):
    """torchrun starts num_proc_per_node processes in a node pod; each would otherwise size its OpenMP pool by the
    host's cores. The share is the pod's CPU limit (rounded up, as the downward API does) over the processes."""
    manifest = _manifest({"PIXTRAIN_GPU_CPU": gpu_cpu}, gpus_per_node=gpus_per_node)
    env = {e["name"]: e for e in manifest["spec"]["trainer"]["env"]}
    assert env["OMP_NUM_THREADS"] == {"name": "OMP_NUM_THREADS", "value": threads}


def test_secrets_go_by_reference_only():
    manifest = _manifest(dict(SECRET_CANARIES))
    text = json.dumps(manifest)
    assert not [v for v in SECRET_CANARIES.values() if v in text]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in manifest["spec"]["trainer"]["env"] if "valueFrom" in e}
    # Least privilege: the training processes log to W&B and need nothing else (no hub token, no database).
    assert refs == {"WANDB_API_KEY": {"name": "pixtrain-wandb", "key": "WANDB_API_KEY"}}


def test_pods_carry_the_labels_the_network_policy_selects():
    manifest = _manifest()
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    labels = patch["template"]["spec"]["template"]["metadata"]["labels"]
    assert labels[TRAINJOB_POD_LABEL] == "true"
    assert {"containerPort": RENDEZVOUS_PORT, "protocol": "TCP"} in trainjob_pod_spec(manifest)["containers"][0][
        "ports"
    ]


def test_kueue_queue_label_and_runtime_choice():
    ts = TrainJobSettings.from_env(
        {"PIXTRAIN_TRAINJOB_KUEUE_QUEUE": "gpu-queue", "PIXTRAIN_TRAINJOB_RUNTIME": "pixtrain-torch-volcano"}
    )
    manifest = _manifest(trainjob_settings=ts)
    assert manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert manifest["spec"]["runtimeRef"]["name"] == "pixtrain-torch-volcano"
    assert KUEUE_QUEUE_LABEL not in _manifest()["metadata"]["labels"]
    with pytest.raises(TrainJobSettingsError, match="PIXTRAIN_TRAINJOB_RUNTIME_KIND"):
        TrainJobSettings.from_env({"PIXTRAIN_TRAINJOB_RUNTIME_KIND": "Runtime"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_nodes": 1}, "one node trains inside the step pod"),
        ({"gpus_per_node": 0}, "at least one GPU"),
        ({"name": "Pixtrain_Run"}, "DNS label"),
        ({"name": "p" * 41}, "at most 40"),
        ({"image": ""}, "PIXTRAIN_IMAGE"),
    ],
)
def test_impossible_trainjobs_are_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _manifest(**kwargs)


def test_launcher_overlay_turns_the_gpu_step_pod_into_a_small_pod_with_a_trainjob_token():
    """dagster-k8s's own merge (op tag, then per_step_k8s_config) of the GPU step shape and the overlay."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    settings = ExecutionSettings.from_env({})

    def context(config):
        return K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config))

    gpu_step = step_pod_tags("gpu", settings)[K8S_CONFIG_TAG]
    merged = context(gpu_step).merge(context(trainjob_launcher_k8s_config(settings))).run_k8s_config
    resources = merged.container_config["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
    pod = merged.pod_spec_config
    assert pod["service_account_name"] == "pixtrain-trainjob-launcher" and pod["automount_service_account_token"]
    assert pod["node_selector"] == {} and pod["tolerations"] == []
    assert merged.pod_template_spec_metadata["labels"]["pixtrain/trainjob-launcher"] == "true"
    # What the overlay does not name keeps the hardened step values.
    assert pod["security_context"] == gpu_step["pod_spec_config"]["security_context"]
    assert merged.container_config["security_context"] == gpu_step["container_config"]["security_context"]
