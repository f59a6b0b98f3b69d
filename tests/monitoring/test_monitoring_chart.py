"""The monitoring objects of k8s/pixtrain-infra: rendered by helm, the PodMonitor and PrometheusRule validated
strictly (unknown fields and wrong types rejected) against the prometheus-operator models from PyPI and, when a
copy is present, the real CRD schemas (tests/monitoring/operator_schema.py), the dashboard ConfigMap and JSON, and
the NetworkPolicy that admits scrapes only from the monitoring namespace."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pixtrain_dagster.execution import METRICS_POD_LABELS, METRICS_PORT
from pixtrain_dagster.monitoring import dashboard

from . import operator_schema
from .prom_support import INFRA_CHART, MONITORING_VALUES, monitoring_objects, render_chart

KINDS = ("PodMonitor", "PrometheusRule")


def _sources():
    yield pytest.param(operator_schema.model_errors, id="models")
    directory = operator_schema.crd_dir()
    yield pytest.param(
        (lambda obj: operator_schema.crd_errors(obj, directory)) if directory else None,
        id="crd",
        marks=pytest.mark.skipif(
            directory is None,
            reason=(
                "no copy of the prometheus-operator CRDs (monitoring.coreos.com_podmonitors.yaml and "
                "monitoring.coreos.com_prometheusrules.yaml): set $PIXTRAIN_PROMETHEUS_CRDS_DIR or put them in "
                "shared/crds/ (see tests/monitoring/operator_schema.py)"
            ),
        ),
    )


@pytest.fixture(scope="module")
def objects() -> dict:
    return monitoring_objects()


@pytest.mark.parametrize("errors", _sources())
@pytest.mark.parametrize("kind", KINDS)
def test_custom_resources_match_the_prometheus_operator_schema(objects, kind, errors):
    obj = objects[kind]
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert errors(obj) == []


# (kind, path to a mapping in the object, change, what the error must name): each must be rejected.
BROKEN = [
    ("PodMonitor", ("spec",), {"selectr": {}}, "spec.selectr"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0), {"intervall": "30s"}, "podMetricsEndpoints.0.intervall"),
    ("PodMonitor", ("spec", "selector"), {"matchLabel": {"a": "b"}}, "selector.matchLabel"),
    ("PodMonitor", ("spec",), {"pod_metrics_endpoints": []}, "spec.pod_metrics_endpoints"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0), {"honorLabels": "true"}, "podMetricsEndpoints.0.honorLabels"),
    ("PodMonitor", ("spec", "namespaceSelector"), {"matchNames": "pixtrain"}, "namespaceSelector.matchNames"),
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0), {"scheme": "htp"}, "podMetricsEndpoints.0.scheme"),
    ("PrometheusRule", ("spec",), {"groupz": []}, "spec.groupz"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"expresion": "up"}, "rules.0.expresion"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"for": 300}, "rules.0.for"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"for": "5 minutes"}, "rules.0.for"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"labels": {"severity": 3}}, "labels.severity"),
]


@pytest.mark.parametrize("errors", _sources())
@pytest.mark.parametrize(
    "kind,path,change,field", BROKEN, ids=[b[3] + "=" + repr(list(b[2].values())[0]) for b in BROKEN]
)
def test_the_schema_check_rejects_misspelt_and_mistyped_fields(objects, errors, kind, path, change, field):
    broken = copy.deepcopy(objects[kind])
    node = broken
    for key in path:
        node = node[key]
    node.update(change)
    found = errors(broken)
    assert any(field in error for error in found), f"{change} at {path} was accepted: {found}"


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
    for metric in (
        "pixtrain_gpu_utilization_ratio",
        "pixtrain_gpu_memory_used_bytes",
        "pixtrain_training_loss",
        "pixtrain_training_validation_loss",
        "pixtrain_training_tokens_total",
        "pixtrain_training_mfu_ratio",
        "pixtrain_training_optimizer_step_seconds",
        "pixtrain_training_data_wait_seconds",
        "pixtrain_process_cpu_seconds_total",
        "pixtrain_process_resident_memory_bytes",
        "pixtrain_process_read_bytes_total",
        "pixtrain_training_checkpoint_save_seconds",
        "pixtrain_pipeline_runs_failed_total",
        "pixtrain_pipeline_gate_failures_total",
        "pixtrain_pipeline_last_promotion_timestamp_seconds",
    ):
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
            continue  # custom resources: checked against the prometheus-operator schemas above
        if obj["kind"] in ("ConfigMap", "NetworkPolicy"):
            validate_strict(obj, versions=("1.29.0", "1.37.0"))
    assert len([o for o in objects if pod_spec_of(o) is not None]) == len(
        [o for o in render_chart() if pod_spec_of(o) is not None]
    )


def test_helm_lint_strict_with_monitoring_enabled():
    import subprocess

    from .prom_support import tool

    result = subprocess.run(
        [tool("helm"), "lint", "--strict", str(INFRA_CHART), "-f", str(MONITORING_VALUES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "0 chart(s) failed" in result.stdout, result.stdout + result.stderr


def test_pushgateway_url_reaches_the_code_server_and_only_it_may_push():
    objects = render_chart(MONITORING_VALUES)
    (env,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pixtrain-execution-env"]
    assert env["data"]["PIXTRAIN_PUSHGATEWAY_URL"] == "http://prometheus-pushgateway.monitoring.svc:9091"
    (policy,) = [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "allow-pushgateway-egress"
    ]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"component": "user-deployments"}}
    (rule,) = policy["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9091}]
    assert rule["to"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    default = render_chart()
    assert not [o for o in default if o["metadata"]["name"] == "allow-pushgateway-egress"]
    (env,) = [o for o in default if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pixtrain-execution-env"]
    assert "PIXTRAIN_PUSHGATEWAY_URL" not in env["data"]
