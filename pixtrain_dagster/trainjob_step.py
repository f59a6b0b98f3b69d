"""Dagster side of multi-node training: what the ``lora_training`` step calls when ``num_nodes > 1``.

Thin: builds the Kubernetes clients in the cluster, names the TrainJob after the run, step and retry, maps
"the Dagster run is being cancelled" onto the launcher's ``should_cancel``, and turns a failed TrainJob into a
``dagster.Failure`` whose description and metadata carry the pod reasons. The work is in
``pixtrain_dagster.trainjob``.

Logs: rank 0's log lines are streamed into the step's Dagster log (``context.log``) by polling the pod log
with timestamps. Dagster Pipes is not used: ``PipesK8sClient`` launches and reads exactly one pod it creates
itself, a TrainJob's pods are created by the Trainer/JobSet controllers, and the training processes would
have to speak the Pipes protocol (core/ stays free of any dagster package). The training result comes back
as the JSON file rank 0 writes next to the request on shared storage, which the step reads afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .execution import ExecutionSettings
from .trainjob import (
    KubeApis,
    Phase,
    TrainJobOutcome,
    TrainJobSettings,
    build_trainjob,
    run_trainjob,
    trainjob_name,
)

# How often the step polls the TrainJob and rank 0's log.
DEFAULT_POLL_SECONDS = 15.0


def kube_apis_in_cluster() -> KubeApis:
    """Clients authenticated as the run worker's service account (Role pixtrain-run-worker-trainjobs)."""
    from kubernetes import client, config

    config.load_incluster_config()
    return KubeApis(custom=client.CustomObjectsApi(), core=client.CoreV1Api())


def _run_is_cancelling(context) -> bool:
    from dagster import DagsterRunStatus

    run = context.instance.get_run_by_id(context.run.run_id)
    return run is not None and run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)


def step_image(context, settings: ExecutionSettings, environ: Mapping[str, str]) -> str:
    """The image the step runs: PIXTRAIN_IMAGE if set, else the run's image (the code location's)."""
    image = settings.image or context.run.tags.get("dagster/image") or environ.get("DAGSTER_CURRENT_IMAGE", "")
    if not image:
        from dagster import Failure

        raise Failure(
            "multi-node training needs the training image for the TrainJob pods: set PIXTRAIN_IMAGE in the "
            "pixtrain-execution-env ConfigMap (k8s/pixtrain-infra values execution.image)"
        )
    return image


def launch_multinode_training(
    context,
    *,
    request_uri: str,
    num_nodes: int,
    gpus_per_node: int,
    timeout_s: float | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    apis: KubeApis | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrainJobOutcome:
    """Run the training request at ``request_uri`` as a TrainJob of ``num_nodes`` x ``gpus_per_node`` GPUs.

    Returns the outcome when the TrainJob succeeded; raises ``dagster.Failure`` (with the pod reasons) when it
    failed, timed out or the run was cancelled. The TrainJob is deleted in all of those cases, and when the
    step is interrupted. A Dagster retry of the step creates a new TrainJob that resumes from the last
    checkpoint on the checkpoints PVC.
    """
    from dagster import Failure, MetadataValue

    env: Mapping[str, str] = os.environ if environ is None else environ
    settings = ExecutionSettings.from_env(env)
    op_context = getattr(context, "op_execution_context", context)  # asset or op context
    manifest = build_trainjob(
        name=trainjob_name(context.run.run_id, op_context.op.name, op_context.retry_number),
        request_uri=request_uri,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        image=step_image(context, settings, env),
        settings=settings,
        trainjob_settings=TrainJobSettings.from_env(env),
        labels={"dagster/run-id": context.run.run_id},
    )
    outcome = run_trainjob(
        apis or kube_apis_in_cluster(),
        manifest,
        settings.namespace,
        context.log,
        poll_seconds=poll_seconds,
        timeout_s=timeout_s,
        should_cancel=lambda: _run_is_cancelling(context),
    )
    if outcome.phase is not Phase.SUCCEEDED:
        metadata: dict[str, Any] = {
            "trainjob": MetadataValue.text(outcome.name),
            "phase": MetadataValue.text(outcome.phase.value),
            "pod_problems": MetadataValue.md(
                "\n".join(f"- {p.describe()}" for p in outcome.problems) or "none reported"
            ),
        }
        raise Failure(
            description=f"TrainJob {outcome.name} {outcome.phase.value}: {outcome.message}",
            metadata=metadata,
            allow_retries=outcome.phase is not Phase.CANCELLED,
        )
    return outcome
