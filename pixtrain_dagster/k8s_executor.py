"""The Kubernetes executor: dagster-k8s's ``k8s_job_executor``, with the ``lora_training`` step pod sized from the
run's own training config, so a run that asks for ``devices: 4`` gets a pod with 4 GPUs, and one that asks for
``num_nodes: 2`` gets the small TrainJob-launcher pod, without a second, hand-written ``per_step_k8s_config``.

Merge order, lowest first: run launcher, executor config, op tags (the deployment's GPU step shape), this run's
training shape, then ``per_step_k8s_config`` (an explicit override still wins). Imported only when
PIXTRAIN_EXECUTOR=k8s: dagster_k8s costs ~1.6 s to import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dagster import executor
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster_k8s import k8s_job_executor
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.executor import K8sStepHandler
from dagster_k8s.job import UserDefinedDagsterK8sConfig

from .core.settings import LoraTrainingSettings
from .execution import GPU_RESOURCE, ExecutionSettings, load_settings

TRAINING_OP = "lora_training"


class TrainingShapeError(ValueError):
    """The run's training config asks for a pod shape that cannot exist; the message names the field."""


def training_pod_shape(
    run_config: Mapping[str, Any], settings: ExecutionSettings, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """``dagster-k8s/config`` for this run's lora_training pod from its ``devices`` / ``num_nodes`` (unset: the
    training config's defaults, as the step will see them); None when that is the deployment's GPU shape.

    Only the GPU count follows ``devices``: CPU, memory and /dev/shm stay the deployment's per-pod values
    (``execution.gpu.*``), so raise those for runs with many more GPUs than ``execution.gpu.count``."""
    config = (((run_config or {}).get("ops") or {}).get(TRAINING_OP) or {}).get("config") or {}
    devices, num_nodes = config.get("devices"), config.get("num_nodes")
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TrainingShapeError(f"ops.{TRAINING_OP}.config.{name}={value!r}: must be a whole number >= 1")
    if (num_nodes or 1) > 1:
        from .trainjob import TrainJobSettings, trainjob_launcher_k8s_config

        # The step pod only creates and follows the TrainJob; the GPUs are in the TrainJob's pods.
        return trainjob_launcher_k8s_config(
            settings, TrainJobSettings.from_env(os.environ if environ is None else environ)
        )
    devices = LoraTrainingSettings().devices if devices is None else devices  # the training config's default
    if devices == settings.gpu_count:
        return None
    amounts = {GPU_RESOURCE: str(devices)}
    return {"container_config": {"resources": {"requests": dict(amounts), "limits": dict(amounts)}}}


class RunSizedK8sStepHandler(K8sStepHandler):
    """dagster-k8s's step handler; only the training step's container context gains the run's shape."""

    settings: ExecutionSettings

    def _get_container_context(self, step_handler_context) -> K8sContainerContext:
        context = super()._get_container_context(step_handler_context)
        step_key = self._get_step_key(step_handler_context)
        op_name = step_handler_context.get_step_context(step_key).step.op_name
        if op_name != TRAINING_OP:
            return context
        shape = training_pod_shape(step_handler_context.dagster_run.run_config, self.settings)
        if shape is None:
            return context
        explicit = UserDefinedDagsterK8sConfig.from_dict(self._per_step_k8s_config.get(op_name, {}))
        return context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(shape))).merge(
            K8sContainerContext(run_k8s_config=explicit)
        )  # re-applied on top: an explicit override wins


def run_sized_k8s_executor(settings: ExecutionSettings | None = None):
    """``k8s_job_executor`` (same config schema and behaviour) whose step handler is RunSizedK8sStepHandler."""
    settings = settings or load_settings()

    @executor(
        name="k8s", config_schema=k8s_job_executor.config_schema, requirements=multiple_process_executor_requirements()
    )
    def pixtrain_k8s_executor(init_context):
        built = k8s_job_executor.executor_creation_fn(init_context)
        # dagster-k8s builds its handler from the executor config inside that factory; rather than copy the
        # factory, the handler it built becomes our subclass (same state, one overridden method).
        # dagster-k8s is pinned, and tests/k8s renders every step job through this path.
        handler = built._step_handler  # noqa: SLF001
        if type(handler) is not K8sStepHandler:  # a dagster-k8s upgrade changed the factory: fail loudly
            raise TypeError(f"k8s_job_executor built a {type(handler).__name__}, expected K8sStepHandler")
        handler.__class__ = RunSizedK8sStepHandler
        handler.settings = settings
        return built

    return pixtrain_k8s_executor
