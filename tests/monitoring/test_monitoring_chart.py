"""The monitoring objects of k8s/pixtrain-infra: rendered by helm, validated strictly against the vendored
prometheus-operator CRD schemas (tests/monitoring/crds, v0.93.0), the dashboard ConfigMap and JSON, and the
NetworkPolicy that admits scrapes only from the monitoring namespace."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pixtrain_dagster.execution import METRICS_POD_LABELS, METRICS_PORT
from pixtrain_dagster.monitoring import dashboard

from .prom_support import INFRA_CHART, MONITORING_VALUES, monitoring_objects, render_chart

CRDS = Path(__file__).parent / "crds"


def _strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it with field validation Strict: unknown fields are errors."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_schema(plural: str) -> dict:
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text())
    assert crd["metadata"]["annotations"]["operator.prometheus.io/version"] == "0.93.0"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server itself, not by the CRD schema
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.fixture(scope="module")
def objects() -> dict:
    return monitoring_objects()


@pytest.mark.parametrize("kind,plural", [("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")])
def test_custom_resources_match_the_prometheus_operator_crd_schema(objects, kind, plural):
    schema = _crd_schema(plural)
    obj = objects[kind]
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    # No metaschema check: the CRDs carry Go regexes ("(?i)" mid-pattern) that Python's re rejects as patterns;
    # they only matter for fields we do not set.
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(obj)
    broken = copy.deepcopy(obj)  # the check is strict: a misspelt field is rejected
    broken["spec"]["selectr" if kind == "PodMonitor" else "groupz"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_pod_monitor_selects_step_pods_on_the_named_port(objects):
    spec = objects["PodMonitor"]["spec"]
    assert spec["selector"]["matchLabels"] == dict(METRICS_POD_LABELS)
    assert spec["podMetricsEndpoints"][0]["port"] == "metrics"
    assert spec["namespaceSelector"]["matchNames"] == ["pixtrain"]
    assert objects["PodMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_configmap_for_the_grafana_sidecar(objects):
    configmap = objects["DashboardConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    assert json.loads(text) == dashboard.build_dashboard()


def test_committed_dashboard_json_is_what_the_generator_writes():
    path = INFRA_CHART / "files" / "dashboards" / "training.json"
    assert path.read_text() == dashboard.render(), "run: python -m pixtrain_dagster.monitoring.dashboard"


def test_dashboard_uid_datasource_variable_unique_ids_and_required_panels():
    board = dashboard.build_dashboard()
    assert board["uid"] == "training"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in ("pixtrain_gpu_utilization_ratio", "pixtrain_gpu_memory_used_bytes", "pixtrain_training_loss",
                   "pixtrain_training_validation_loss", "pixtrain_training_tokens_total", "pixtrain_training_mfu_ratio",
                   "pixtrain_training_optimizer_step_seconds", "pixtrain_training_data_wait_seconds",
                   "pixtrain_process_cpu_seconds_total", "pixtrain_process_resident_memory_bytes",
                   "pixtrain_process_read_bytes_total", "pixtrain_training_checkpoint_save_seconds",
                   "pixtrain_pipeline_runs_failed_total", "pixtrain_pipeline_gate_failures_total",
                   "pixtrain_pipeline_last_promotion_timestamp_seconds"):
        assert metric in exprs, metric


def test_monitoring_is_off_by_default_and_the_scrape_policy_admits_only_the_monitoring_namespace():
    default = render_chart()
    assert not [o for o in default if o["kind"] in ("PodMonitor", "PrometheusRule")]
    assert not [o for o in default if o.get("metadata", {}).get("labels", {}).get("grafana_dashboard")]
    (policy,) = [o for o in default if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-metrics-scrape"]
    assert policy["spec"]["podSelector"] == {"matchLabels": dict(METRICS_POD_LABELS)}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]


def test_rendered_monitoring_objects_pass_strict_kubernetes_validation_and_add_no_pods():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from k8s.k8s_support import validate_strict
    from k8s.pod_security import pod_spec_of

    objects = render_chart(MONITORING_VALUES)
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # custom resources: checked against the CRD schemas above
        if obj["kind"] in ("ConfigMap", "NetworkPolicy"):
            validate_strict(obj, versions=("1.29.0", "1.37.0"))
    assert len([o for o in objects if pod_spec_of(o) is not None]) == len(
        [o for o in render_chart() if pod_spec_of(o) is not None])


def test_helm_lint_strict_with_monitoring_enabled():
    import subprocess

    from .prom_support import tool

    result = subprocess.run([tool("helm"), "lint", "--strict", str(INFRA_CHART), "-f", str(MONITORING_VALUES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


def test_pushgateway_url_reaches_the_code_server_and_only_it_may_push():
    objects = render_chart(MONITORING_VALUES)
    (env,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pixtrain-execution-env"]
    assert env["data"]["PIXTRAIN_PUSHGATEWAY_URL"] == "http://prometheus-pushgateway.monitoring.svc:9091"
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-pushgateway-egress"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"component": "user-deployments"}}
    (rule,) = policy["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9091}]
    assert rule["to"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    default = render_chart()
    assert not [o for o in default if o["metadata"]["name"] == "allow-pushgateway-egress"]
    (env,) = [o for o in default if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pixtrain-execution-env"]
    assert "PIXTRAIN_PUSHGATEWAY_URL" not in env["data"]
