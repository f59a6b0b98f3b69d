"""Fixtures for the deployment tests: rendered charts, the Dagster chart values, and the step Jobs that the
k8s executor would submit for the real code location. Nothing here talks to a cluster."""

from __future__ import annotations

import pytest

from .k8s_support import (
    DAGSTER_VALUES,
    INFRA_CHART,
    INFRA_VALUES_FILES,
    SECRET_CANARIES,
    build_step_jobs,
    helm_template,
    load_yaml,
)


@pytest.fixture(scope="session", params=sorted(INFRA_VALUES_FILES))
def infra_render(request) -> tuple[str, list[dict]]:
    """(values name, every object `helm template` renders for it, helm test hooks included)."""
    return request.param, helm_template(INFRA_CHART, *INFRA_VALUES_FILES[request.param])


@pytest.fixture(scope="session")
def dagster_values() -> dict:
    return load_yaml(DAGSTER_VALUES)


@pytest.fixture(scope="session")
def k8s_step_jobs(dagster_values):
    """{step key: (V1Job, namespace)} for every step of the train_adapter job, as the k8s executor builds them."""
    return step_jobs_for_run(dagster_values)


def step_jobs_for_run(dagster_values: dict, run_config: dict | None = None) -> dict:
    """{step key: (V1Job, namespace)} for every step of a train_adapter run with ``run_config``.

    The code location is loaded with PIXTRAIN_EXECUTOR=k8s (as the pixtrain-execution-env ConfigMap sets it),
    on an instance whose K8sRunLauncher is configured from k8s/dagster-values.yaml.
    """
    from dagster._core.test_utils import environ, instance_for_test

    from pixtrain_dagster import execution

    # Imported before PIXTRAIN_EXECUTOR=k8s is set: its module-level `defs`, which other tests use, must
    # keep the local executor. The k8s variant is built with build_definitions() below.
    from pixtrain_dagster.definitions import build_definitions

    from .k8s_support import run_launcher_config_from_chart_values

    execution.load_settings.cache_clear()
    try:
        with environ({"PIXTRAIN_EXECUTOR": "k8s", **SECRET_CANARIES}):
            job = build_definitions().resolve_job_def("train_adapter")
            launcher_config = run_launcher_config_from_chart_values(dagster_values, namespace="pixtrain")
            with instance_for_test(
                overrides={
                    "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config}
                }
            ) as instance:
                _executor, jobs = build_step_jobs(job, job.executor_def, instance, run_config=run_config)
    finally:
        execution.load_settings.cache_clear()
    return jobs
