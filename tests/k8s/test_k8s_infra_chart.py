"""k8s/pixtrain-infra: lint, render every values file, validate every object strictly, and check the
security properties the chart exists for."""

from __future__ import annotations

import ipaddress
import json

import pytest

from pixtrain_dagster.execution import K8S_CONFIG_TAG, ExecutionSettings, step_pod_tags

from .k8s_support import INFRA_CHART, INFRA_VALUES_FILES, helm, validate_strict
from .pod_security import pod_spec_of, violations

CLUSTER_SCOPED = {"Namespace", "PriorityClass"}


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _training_namespace(objects: list[dict]) -> str:
    return _one(objects, "ConfigMap", "pixtrain-execution-env")["data"]["PIXTRAIN_K8S_NAMESPACE"]


@pytest.mark.parametrize("values_name", sorted(INFRA_VALUES_FILES))
def test_helm_lint_strict(values_name):
    args = [a for f in INFRA_VALUES_FILES[values_name] for a in ("-f", f)]
    assert "0 chart(s) failed" in helm("lint", "--strict", INFRA_CHART, *args)


def test_every_object_is_valid_kubernetes_for_every_supported_version(infra_render):
    _, objects = infra_render
    assert len(objects) > 20
    for obj in objects:
        validate_strict(obj)


def test_every_pod_meets_the_restricted_profile(infra_render):
    _, objects = infra_render
    pods = [(o["metadata"]["name"], pod_spec_of(o)) for o in objects if pod_spec_of(o) is not None]
    assert pods, "the GPU smoke test pod should be rendered"
    for name, spec in pods:
        assert violations(spec) == [], name
        assert spec["automountServiceAccountToken"] is False, name


def test_objects_live_in_the_training_namespace_not_the_release_namespace(infra_render):
    values_name, objects = infra_render
    namespace = _training_namespace(objects)
    assert namespace == {"base": "pixtrain", "dev": "pixtrain-dev", "prod": "pixtrain"}[values_name]
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == namespace, f"{obj['kind']}/{obj['metadata']['name']}"
    labels = _one(objects, "Namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_no_secret_is_created_by_the_chart(infra_render):
    _, objects = infra_render
    assert not _of_kind(objects, "Secret")
    text = json.dumps(objects).lower()
    assert "stringdata" not in text and "-----begin" not in text


def test_storage_claims(infra_render):
    values_name, objects = infra_render
    claims = {o["metadata"]["name"]: o for o in _of_kind(objects, "PersistentVolumeClaim")}
    assert set(claims) == {"pixtrain-training-data", "pixtrain-model-output", "pixtrain-checkpoints", "pixtrain-cache"}
    if values_name != "dev":
        assert claims["pixtrain-training-data"]["spec"]["accessModes"] == ["ReadOnlyMany"]
        sizes = {name: c["spec"]["resources"]["requests"]["storage"] for name, c in claims.items()}
        assert sizes == {
            "pixtrain-training-data": "500Gi",
            "pixtrain-model-output": "200Gi",
            "pixtrain-checkpoints": "100Gi",
            "pixtrain-cache": "100Gi",
        }
        for claim in claims.values():  # helm uninstall must never delete training data or models
            assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in ("pixtrain-model-output", "pixtrain-checkpoints", "pixtrain-cache"):
        assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], "step pods on different nodes share them"


def test_network_is_default_deny_with_narrow_allowances(infra_render):
    values_name, objects = infra_render
    policies = {o["metadata"]["name"]: o["spec"] for o in _of_kind(objects, "NetworkPolicy")}
    deny = policies["default-deny-all"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without 'from' admits every source"
            assert rule.get("ports"), f"{name}: ingress must name its ports"
        for rule in spec.get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule without 'to' allows every destination"
            assert rule.get("ports"), f"{name}: egress must name its ports"
    dns = policies["allow-dns-egress"]["egress"][0]
    assert {p["port"] for p in dns["ports"]} == {53}
    grpc = policies["allow-code-server-grpc"]
    assert grpc["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 3030}]
    # With the authenticating proxy on (the default), the webserver admits only the proxy.
    webserver = policies["allow-webserver-ingress-from-auth-proxy"]
    assert webserver["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 3000}]
    # Step pods never reach the API server: the API egress policies select other pods only.
    for name, spec in policies.items():
        if name.startswith("allow-kube-api-egress"):
            assert spec["podSelector"]["matchLabels"] != {"app.kubernetes.io/component": "step_worker"}
    if values_name == "prod":
        # PHI environment: no path to "anywhere".
        for name, spec in policies.items():
            for rule in spec.get("egress", []):
                for peer in rule["to"]:
                    if "ipBlock" in peer:
                        network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                        assert network.prefixlen >= 8, f"{name}: {network} is far too broad for prod"


def test_rbac_is_minimal(infra_render):
    _, objects = infra_render
    # Other Roles: the control plane's (test_k8s_least_privilege.py), the TrainJob launcher's
    # (test_k8s_trainjob_chart.py)
    role = _one(objects, "Role", "pixtrain-run-worker")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "secrets" not in rule["resources"], "run workers never read Secrets"
        assert not {"update", "patch", "escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    granted = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted[("batch", "jobs")] == {"create", "get", "list", "watch", "delete"}
    assert granted[("", "pods/log")] == {"get"}
    binding = _one(objects, "RoleBinding", "pixtrain-run-worker")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pixtrain-run-worker", "namespace": _training_namespace(objects)}
    ]
    accounts = {o["metadata"]["name"]: o for o in _of_kind(objects, "ServiceAccount")}
    assert accounts["pixtrain-run-worker"]["automountServiceAccountToken"] is True
    assert accounts["pixtrain-step"]["automountServiceAccountToken"] is False
    assert accounts["pixtrain-code-server"]["automountServiceAccountToken"] is False


def test_quota_covers_gpus_and_limit_range_sets_defaults(infra_render):
    _, objects = infra_render
    (quota,) = _of_kind(objects, "ResourceQuota")
    assert int(quota["spec"]["hard"]["requests.nvidia.com/gpu"]) >= 1
    (limits,) = _of_kind(objects, "LimitRange")
    assert {"default", "defaultRequest", "max"} <= set(limits["spec"]["limits"][0])


def test_execution_configmap_drives_step_pods_onto_objects_the_chart_creates(infra_render):
    """ConfigMap -> ExecutionSettings -> op tags: every name the step pods use must exist in the chart."""
    _, objects = infra_render
    data = _one(objects, "ConfigMap", "pixtrain-execution-env")["data"]
    assert data["PIXTRAIN_EXECUTOR"] == "k8s"
    settings = ExecutionSettings.from_env(data)  # raises if the chart writes a value the code rejects
    gpu = step_pod_tags("gpu", settings)[K8S_CONFIG_TAG]
    claims = {o["metadata"]["name"] for o in _of_kind(objects, "PersistentVolumeClaim")}
    assert {
        settings.cache_claim,
        settings.artifacts_claim,
        settings.checkpoints_claim,
        settings.training_data_claim,
    } == claims
    priority_classes = {o["metadata"]["name"] for o in _of_kind(objects, "PriorityClass")}
    assert gpu["pod_spec_config"]["priority_class_name"] in priority_classes
    accounts = {o["metadata"]["name"] for o in _of_kind(objects, "ServiceAccount")}
    assert settings.step_service_account in accounts
    quota = _of_kind(objects, "ResourceQuota")[0]["spec"]["hard"]
    assert settings.gpu_count <= int(quota["requests.nvidia.com/gpu"]), "one GPU step must fit in the quota"
    assert data["PIXTRAIN_DB_HOST"], "without a metadata database each step pod would write SQLite on its emptyDir"
