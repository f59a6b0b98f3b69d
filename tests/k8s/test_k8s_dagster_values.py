"""k8s/dagster-values*.yaml for the official Dagster Helm chart.

The chart is not in any PyPI or npm package (and its values.schema.json has remote $refs), so it cannot be
rendered offline. Instead: (1) every key we set is checked against the chart's documented values schema
(DOCUMENTED_KEYS, transcribed from helm/dagster/schema of dagster 1.13), so a typo such as `runK8SConfig`
fails here rather than being ignored by Helm; (2) the pods the chart builds from these values are
assembled the way its templates do and checked against Pod Security "restricted" and the Kubernetes
schemas; (3) the values must agree with k8s/pixtrain-infra and pixtrain_dagster/execution.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from pixtrain_dagster.execution import CONTAINER_SECURITY_CONTEXT, GPU_TAG_KEY, POD_SECURITY_CONTEXT

from .k8s_support import DAGSTER_VALUES, INFRA_CHART, api_dict, load_yaml, validate_strict
from .pod_security import violations

VARIANTS = {
    "base": (DAGSTER_VALUES,),
    "dev": (DAGSTER_VALUES, DAGSTER_VALUES.with_name("dagster-values-dev.yaml")),
    "prod": (DAGSTER_VALUES, DAGSTER_VALUES.with_name("dagster-values-prod.yaml")),
}

# Documented keys of the sections we set: a dict is a section (its keys are the allowed ones), None
# means "free-form below this point" (raw Kubernetes objects, maps of labels, ...).
_POD_FIELDS = dict.fromkeys(
    [
        "env",
        "envConfigMaps",
        "envSecrets",
        "annotations",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "labels",
        "volumeMounts",
        "volumes",
        "schedulerName",
        "deploymentLabels",
        "initContainers",
    ]
)
_IMAGE = {"repository": None, "tag": None, "pullPolicy": None}
DOCUMENTED_KEYS: dict[str, Any] = {
    "x-pixtrain-hardening": None,  # YAML anchors only; the chart allows extra top-level keys
    "x-pixtrain-prod-hardening": None,  # the same, in dagster-values-prod.yaml
    "busybox": {"image": _IMAGE},  # the webserver's init-user-deployment container (pinned in prod)
    "global": {
        "postgresqlSecretName": None,
        "dagsterHome": None,
        "serviceAccountName": None,
        "celeryConfigSecretName": None,
        "dagsterInstanceConfigMap": None,
    },
    "generatePostgresqlPasswordSecret": None,
    "postgresql": {
        "postgresqlScheme": None,
        "image": _IMAGE,
        "enabled": None,
        "postgresqlHost": None,
        "postgresqlUsername": None,
        "postgresqlPassword": None,
        "postgresqlDatabase": None,
        "postgresqlParams": None,
        "service": {"port": None},
    },
    "telemetry": {"enabled": None},
    "computeLogManager": {"type": None, "config": None},
    "rbacEnabled": None,
    "serviceAccount": {"create": None, "name": None, "annotations": None},
    "dagsterWebserver": {
        **_POD_FIELDS,
        "replicaCount": None,
        "image": _IMAGE,
        "nameOverride": None,
        "service": {"type": None, "port": None, "annotations": None},
        "workspace": None,
        "pathPrefix": None,
        "enableReadOnly": None,
        "dbStatementTimeout": None,
        "dbPoolRecycle": None,
        "logLevel": None,
    },
    "dagster-user-deployments": {
        "enabled": None,
        "enableSubchart": None,
        "imagePullSecrets": None,
        "serviceAccount": {"create": None, "name": None, "annotations": None},
        "deployments": [
            {
                **_POD_FIELDS,
                "name": None,
                "image": _IMAGE,
                "dagsterApiGrpcArgs": None,
                "codeServerArgs": None,
                "includeConfigInLaunchedRuns": {"enabled": None},
                "deploymentNamespace": None,
                "port": None,
                "replicaCount": None,
                "sidecarContainers": None,
                "deploymentStrategy": None,
            }
        ],
    },
    "runLauncher": {
        "type": None,
        "config": {
            "k8sRunLauncher": {
                "image": _IMAGE,
                "imagePullPolicy": None,
                "jobNamespace": None,
                "loadInclusterConfig": None,
                "kubeconfigFile": None,
                "envConfigMaps": None,
                "envSecrets": None,
                "envVars": None,
                "volumeMounts": None,
                "volumes": None,
                "labels": None,
                "failPodOnRunFailure": None,
                "resources": None,
                "schedulerName": None,
                "securityContext": None,
                "runK8sConfig": {
                    "containerConfig": None,
                    "podSpecConfig": None,
                    "podTemplateSpecMetadata": None,
                    "jobSpecConfig": None,
                    "jobMetadata": None,
                },
            }
        },
    },
    "dagsterDaemon": {
        **_POD_FIELDS,
        "enabled": None,
        "image": _IMAGE,
        "heartbeatTolerance": None,
        "runCoordinator": {
            "enabled": None,
            "type": None,
            "config": {
                "queuedRunCoordinator": {
                    "maxConcurrentRuns": None,
                    "tagConcurrencyLimits": [{"key": None, "value": None, "limit": None}],
                    "dequeueIntervalSeconds": None,
                    "dequeueNumWorkers": None,
                    "dequeueUseThreads": None,
                }
            },
        },
        "runMonitoring": {
            "enabled": None,
            "startTimeoutSeconds": None,
            "cancelTimeoutSeconds": None,
            "maxRuntimeSeconds": None,
            "maxResumeRunAttempts": None,
            "pollIntervalSeconds": None,
            "freeSlotsAfterRunEndSeconds": None,
        },
        "runRetries": {"enabled": None, "maxRetries": None, "retryOnAssetOrOpFailure": None},
        "sensors": None,
        "schedules": None,
    },
    # helm/dagster/templates/helpers/instance/_concurrency.tpl (pools, runs)
    "concurrency": {
        "pools": {"defaultLimit": None, "granularity": None, "opGranularityRunBuffer": None},
        "runs": {"maxConcurrentRuns": None, "tagConcurrencyLimits": None},
    },
}


def helm_merge(base: Any, override: Any) -> Any:
    """Values layering as Helm does it: maps merge recursively, lists and scalars replace, null deletes."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = helm_merge(base.get(key), value)
        return merged
    return copy.deepcopy(override)


def undocumented_keys(values: Any, schema: Any, path: str = "") -> list[str]:
    if schema is None:
        return []
    if isinstance(schema, list):
        return [k for i, item in enumerate(values) for k in undocumented_keys(item, schema[0], f"{path}[{i}]")]
    found = []
    for key, value in values.items():
        where = f"{path}.{key}" if path else key
        if key not in schema:
            found.append(where)
        else:
            found += undocumented_keys(value, schema[key], where)
    return found


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def values(request) -> dict:
    merged: dict = {}
    for path in VARIANTS[request.param]:
        merged = helm_merge(merged, load_yaml(path))
    return merged


def test_every_key_is_a_documented_chart_value(values):
    assert undocumented_keys(values, DOCUMENTED_KEYS) == []


def test_the_key_checker_catches_a_typo():
    typo = {"runLauncher": {"type": "K8sRunLauncher", "config": {"k8sRunLauncher": {"runK8SConfig": {}}}}}
    assert undocumented_keys(typo, DOCUMENTED_KEYS) == ["runLauncher.config.k8sRunLauncher.runK8SConfig"]


def test_external_postgres_with_the_password_from_a_secret(values):
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["postgresql"]["postgresqlPassword"] == ""
    assert values["global"]["postgresqlSecretName"] == "dagster-postgresql-secret"
    assert values["postgresql"]["postgresqlHost"]


_SECRETISH_KEY = re.compile(r"(password|passwd|token|api_?key|secret_?key)$", re.IGNORECASE)


def secret_values_in(node: Any, path: str = "") -> list[str]:
    """Paths of string values under keys that name a secret (names of Secrets are fine, values are not)."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            if _SECRETISH_KEY.search(str(key)) and isinstance(value, str) and value != "":
                found.append(f"{path}.{key}")
            found += secret_values_in(value, f"{path}.{key}")
        return found
    if isinstance(node, list):
        return [p for i, item in enumerate(node) for p in secret_values_in(item, f"{path}[{i}]")]
    return []


def test_no_secret_value_in_any_values_file():
    files = [*DAGSTER_VALUES.parent.glob("dagster-values*.yaml"), *INFRA_CHART.glob("values*.yaml")]
    assert len(files) >= 6
    for file in files:
        assert secret_values_in(load_yaml(file)) == [], f"{file.name}: reference a Secret instead"


def test_the_secret_checker_catches_a_password():
    assert secret_values_in({"postgresql": {"postgresqlPassword": "hunter2", "postgresqlSecretName": "x"}}) == [
        ".postgresql.postgresqlPassword"
    ]


def test_code_location_is_this_project_on_port_3030(values):
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "pixtrain_dagster.definitions"]
    infra = load_yaml(INFRA_CHART / "values.yaml")
    assert deployment["port"] == infra["networkPolicies"]["codeServerPort"] == 3030
    assert values["dagsterWebserver"]["service"]["port"] == infra["networkPolicies"]["webserverPort"]
    assert values["dagster-user-deployments"]["serviceAccount"] == {
        "create": False,
        "name": infra["serviceAccounts"]["codeServer"],
    }
    # Run/step pods must not inherit the code server's pod settings (resources, token, account).
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": False}
    assert {"name": "pixtrain-execution-env"} in deployment["envConfigMaps"]


def test_run_launcher_and_queue(values):
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert {"name": "pixtrain-execution-env"} in launcher["envConfigMaps"]
    pod_spec = launcher["runK8sConfig"]["podSpecConfig"]
    infra = load_yaml(INFRA_CHART / "values.yaml")
    assert pod_spec["serviceAccountName"] == infra["serviceAccounts"]["runWorker"]
    assert pod_spec["automountServiceAccountToken"] is True, "run workers create the step Jobs"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    limits = coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert any(limit["key"] == GPU_TAG_KEY and limit["value"] == "true" and limit["limit"] >= 1 for limit in limits)
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    # The queue can only limit GPU runs that carry the tag: the training job must set it.
    from pixtrain_dagster.definitions import defs

    assert defs.resolve_job_def("train_adapter").tags.get(GPU_TAG_KEY) == "true"
    assert values["computeLogManager"]["type"] == "NoOpComputeLogManager", "step logs may contain PHI"
    assert values["telemetry"]["enabled"] is False


def _camel(snake: dict) -> dict:
    return {
        re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): _camel(v) if isinstance(v, dict) else v
        for k, v in snake.items()
    }


def _pods_built_by_the_chart(values: dict) -> dict[str, dict]:
    """Pod specs as the chart's templates assemble them from these values (contexts, volumes, init containers)."""
    pods = {}
    components = {"dagsterWebserver": "dagster-webserver", "dagsterDaemon": "dagster-daemon"}
    for key, name in components.items():
        part = values[key]
        container = {
            "name": name,
            "image": "dagster/dagster-k8s:1.13.27",
            "securityContext": part["securityContext"],
            "resources": part["resources"],
            "volumeMounts": part["volumeMounts"],
        }
        # The chart's check-db-ready / init-user-deployment init containers reuse the component's context.
        init = {"name": "check-db-ready", "image": "postgres:16", "securityContext": part["securityContext"]}
        pods[name] = {
            "securityContext": part["podSecurityContext"],
            "containers": [container],
            "initContainers": [init],
            "volumes": part["volumes"],
        }
    for deployment in values["dagster-user-deployments"]["deployments"]:
        container = {
            "name": "dagster-user-deployments",
            "image": "pixtrain-dagster:test",
            "securityContext": deployment["securityContext"],
            "resources": deployment["resources"],
            "volumeMounts": deployment["volumeMounts"],
        }
        pods[deployment["name"]] = {
            "securityContext": deployment["podSecurityContext"],
            "containers": [container],
            "volumes": deployment["volumes"],
        }
    run = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    run_container = {"name": "dagster", "image": "pixtrain-dagster:test", **run["containerConfig"]}
    pods["run-worker"] = {**run["podSpecConfig"], "containers": [run_container], "restartPolicy": "Never"}
    return pods


def test_every_pod_the_chart_creates_is_restricted_and_valid(values):
    pods = _pods_built_by_the_chart(values)
    assert set(pods) == {"dagster-webserver", "dagster-daemon", "pixtrain-dagster", "run-worker"}
    for name, spec in pods.items():
        assert violations(spec) == [], name
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), f"{name}: /tmp must be a volume"
        validate_strict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def test_contexts_match_the_step_pods(values):
    """One hardening policy: the chart's contexts are the same as execution.py's for step pods."""
    expected_container = api_dict(_camel(dict(CONTAINER_SECURITY_CONTEXT)))
    expected_pod = api_dict(_camel(dict(POD_SECURITY_CONTEXT)))
    run = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    assert run["containerConfig"]["securityContext"] == expected_container
    assert run["podSpecConfig"]["securityContext"] == expected_pod
    for part in (
        values["dagsterWebserver"],
        values["dagsterDaemon"],
        *values["dagster-user-deployments"]["deployments"],
    ):
        assert part["securityContext"] == expected_container
        assert part["podSecurityContext"] == expected_pod
