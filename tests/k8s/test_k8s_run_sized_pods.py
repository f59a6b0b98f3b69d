"""The lora_training step pod follows the run's own training config (k8s_executor.py): `devices` GPUs in the
pod, or the small TrainJob-launcher pod for `num_nodes > 1`; an explicit per_step_k8s_config still wins, and
every other step keeps the deployment's shape."""

import os

import pytest

from pixtrain_dagster.execution import ExecutionSettings
from pixtrain_dagster.k8s_executor import TrainingShapeError, training_pod_shape

from .conftest import step_jobs_for_run
from .k8s_support import api_dict


def _container(jobs, step):
    job, _namespace = jobs[step]
    (container,) = api_dict(job)["spec"]["template"]["spec"]["containers"]
    return container


def _pod(jobs, step):
    return api_dict(jobs[step][0])["spec"]["template"]["spec"]


def _training(**config):
    return {"ops": {"lora_training": {"config": config}}}


def test_devices_in_the_run_config_size_the_training_pod(dagster_values, k8s_step_jobs):
    jobs = step_jobs_for_run(dagster_values, _training(devices=4, strategy="ddp"))
    resources = _container(jobs, "lora_training")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "4" and resources["requests"]["nvidia.com/gpu"] == "4"
    default = _container(k8s_step_jobs, "lora_training")["resources"]
    assert default["limits"]["nvidia.com/gpu"] == str(ExecutionSettings.from_env(os.environ).gpu_count)
    # CPU and memory, node selector, security contexts: the deployment's GPU step shape, unchanged.
    assert resources["limits"]["cpu"] == default["limits"]["cpu"]
    assert _pod(jobs, "lora_training")["nodeSelector"] == _pod(k8s_step_jobs, "lora_training")["nodeSelector"]
    assert (
        _container(jobs, "lora_training")["securityContext"]
        == _container(k8s_step_jobs, "lora_training")["securityContext"]
    )
    # Evaluation and the bias report run on one GPU whatever the training used.
    assert (
        _container(jobs, "adapter_evaluation")["resources"]
        == _container(k8s_step_jobs, "adapter_evaluation")["resources"]
    )


def test_several_nodes_make_the_training_step_a_small_trainjob_launcher(dagster_values):
    jobs = step_jobs_for_run(dagster_values, _training(num_nodes=2, devices=8))
    resources = _container(jobs, "lora_training")["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
    pod = _pod(jobs, "lora_training")
    assert pod["serviceAccountName"] == "pixtrain-trainjob-launcher" and pod["automountServiceAccountToken"] is True
    assert not pod.get("nodeSelector") and not pod.get("tolerations")
    assert pod["securityContext"]["runAsNonRoot"] is True  # the hardened pod context is kept


def test_an_explicit_per_step_override_in_the_run_config_still_wins(dagster_values):
    run_config = {
        **_training(devices=4),
        "execution": {
            "config": {
                "per_step_k8s_config": {
                    "lora_training": {
                        "container_config": {
                            "resources": {"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}}
                        }
                    }
                }
            }
        },
    }
    jobs = step_jobs_for_run(dagster_values, run_config)
    assert _container(jobs, "lora_training")["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_an_impossible_shape_names_the_field():
    settings = ExecutionSettings.from_env({})
    for bad in (0, "4", True):
        with pytest.raises(TrainingShapeError, match=r"ops\.lora_training\.config\.devices=.*whole number >= 1"):
            training_pod_shape(_training(devices=bad), settings)
    assert training_pod_shape({}, settings) is None  # sensor and schedule runs: the deployment's shape
    assert training_pod_shape(_training(devices=settings.gpu_count), settings) is None


def test_without_devices_the_training_pod_has_the_training_default_of_one_gpu():
    """A sensor run (no run config) trains one process: a deployment with 4-GPU step pods gives it 1 GPU."""
    four = ExecutionSettings.from_env({"PIXTRAIN_GPU_COUNT": "4"})
    shape = training_pod_shape({}, four)
    assert shape["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert training_pod_shape(_training(devices=4), four) is None  # the deployment's shape already fits


@pytest.mark.parametrize(
    "override",
    [
        {"container_config": {"env": [{"name": "PIXTRAIN_GATE_BIAS_MIN_RATIO", "value": "0.01"}]}},
        {"container_config": {"image": "evil:latest"}},
        {"pod_spec_config": {"service_account_name": "pixtrain-trainjob-launcher"}},
        {"pod_spec_config": {"volumes": [{"name": "host", "host_path": {"path": "/"}}]}},
        {"job_spec_config": {"backoff_limit": 5}},
    ],
)
def test_a_run_may_resize_a_step_pod_but_not_change_its_env_account_image_or_volumes(override):
    """Env in particular: a run-set PIXTRAIN_GATE_* would override the deployment's gate policy in that pod."""
    from dagster._core.test_utils import environ

    from pixtrain_dagster.execution import executor_from_env

    with environ({"PIXTRAIN_EXECUTOR": "k8s"}):
        executor_def = executor_from_env()
    allowed = {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
        "pod_spec_config": {"node_selector": {"pool": "h200"}, "tolerations": []},
    }
    mapped = executor_def.apply_config_mapping({"config": {"per_step_k8s_config": {"lora_training": allowed}}})
    assert mapped.value["config"]["per_step_k8s_config"]["lora_training"]["pod_spec_config"]["node_selector"] == {
        "pool": "h200"
    }
    with pytest.raises(Exception) as refused:
        executor_def.apply_config_mapping({"config": {"per_step_k8s_config": {"bias_report_bias_gate": override}}})
    message = str(refused.value.__cause__ or refused.value)
    assert "per_step_k8s_config.bias_report_bias_gate." in message and "cannot be set by a run" in message
