"""k8s/pixtrain-infra's multi-node pieces: the run worker's TrainJob Role, the TrainJob NetworkPolicies and the
gang-scheduling settings, rendered with `helm template` for every values file (and the gang variants)."""

from __future__ import annotations

import pytest

from pixtrain_dagster.execution import ExecutionSettings
from pixtrain_dagster.trainjob import (
    LAUNCHER_POD_LABELS,
    RENDEZVOUS_PORT,
    TRAINJOB_POD_LABEL,
    TrainJobSettings,
    build_trainjob,
    trainjob_launcher_k8s_config,
    trainjob_pod_spec,
)

from .k8s_support import INFRA_CHART, helm, helm_template, validate_strict


def _one(objects, kind, name):
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _render(*sets: str) -> list[dict]:
    import yaml

    args: list[str] = []
    for item in sets:
        args += ["--set", item]
    out = helm("template", "pixtrain-infra", INFRA_CHART, "--namespace", "pixtrain-system", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def test_run_worker_may_manage_trainjobs_and_read_their_pods_and_nothing_more(infra_render):
    _, objects = infra_render
    role = _one(objects, "Role", "pixtrain-run-worker-trainjobs")
    granted = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
    }
    binding = _one(objects, "RoleBinding", "pixtrain-run-worker-trainjobs")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "pixtrain-run-worker-trainjobs",
    }
    assert [s["name"] for s in binding["subjects"]] == ["pixtrain-run-worker", "pixtrain-trainjob-launcher"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == binding["subjects"][0]["namespace"]


def test_trainjob_pods_reach_only_each_other_on_rendezvous_and_nccl_ports(infra_render):
    values_name, objects = infra_render
    policy = _one(objects, "NetworkPolicy", "allow-trainjob-peers")["spec"]
    selector = {"matchLabels": {TRAINJOB_POD_LABEL: "true"}}
    assert policy["podSelector"] == selector and policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    (egress,) = policy["egress"]
    assert ingress["from"] == [{"podSelector": selector}] and egress["to"] == [{"podSelector": selector}]
    for rule in (ingress, egress):
        assert {"protocol": "TCP", "port": RENDEZVOUS_PORT} in rule["ports"]
        (nccl,) = [p for p in rule["ports"] if "endPort" in p]
        assert 1024 <= nccl["port"] < nccl["endPort"] <= 65535
    # The policy selects exactly the pods the launcher builds.
    manifest = build_trainjob(
        name="pixtrain-abc",
        request_uri="/data/artifacts/r.json",
        num_nodes=2,
        gpus_per_node=8,
        image="i:1",
        settings=ExecutionSettings.from_env({}),
    )
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_labels = patch["template"]["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"].items() <= pod_labels.items()
    ports = {p["containerPort"] for p in trainjob_pod_spec(manifest)["containers"][0]["ports"]}
    assert ports == {RENDEZVOUS_PORT}


def test_trainjob_https_egress_follows_the_step_egress(infra_render):
    _, objects = infra_render
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert ("allow-step-https-egress" in names) == ("allow-trainjob-https-egress" in names)


@pytest.mark.parametrize(
    "sets, expected",
    [
        ((), {"PIXTRAIN_TRAINJOB_RUNTIME": "torch-distributed"}),
        (
            ("trainJob.gangScheduling.scheduler=kueue",),
            {"PIXTRAIN_TRAINJOB_RUNTIME": "torch-distributed", "PIXTRAIN_TRAINJOB_KUEUE_QUEUE": "pixtrain-gpu"},
        ),
        (
            ("trainJob.gangScheduling.scheduler=volcano", "trainJob.gangScheduling.volcano.queue=training"),
            {"PIXTRAIN_TRAINJOB_RUNTIME": "pixtrain-torch-volcano", "PIXTRAIN_TRAINJOB_VOLCANO_QUEUE": "training"},
        ),
    ],
    ids=["none", "kueue", "volcano"],
)
def test_gang_scheduling_values_reach_the_trainjob(sets, expected):
    objects = _render(*sets)
    data = _one(objects, "ConfigMap", "pixtrain-trainjob-env")["data"]
    assert data == {
        "PIXTRAIN_TRAINJOB_RUNTIME_KIND": "ClusterTrainingRuntime",
        "PIXTRAIN_TRAINJOB_LAUNCHER_SERVICE_ACCOUNT": "pixtrain-trainjob-launcher",
        **expected,
    }
    for obj in objects:
        if obj["metadata"]["name"] in (
            "pixtrain-trainjob-env",
            "allow-trainjob-peers",
            "pixtrain-trainjob-launcher",
            "allow-kube-api-egress-trainjob-launcher",
            "pixtrain-run-worker-trainjobs",
        ):
            validate_strict(obj, versions=("1.29.0", "1.37.0"))
    manifest = build_trainjob(
        name="pixtrain-abc",
        request_uri="/r.json",
        num_nodes=2,
        gpus_per_node=8,
        image="i:1",
        settings=ExecutionSettings.from_env({}),
        trainjob_settings=TrainJobSettings.from_env(data),
    )
    labels, annotations = manifest["metadata"]["labels"], manifest["metadata"].get("annotations", {})
    assert labels.get("kueue.x-k8s.io/queue-name") == expected.get("PIXTRAIN_TRAINJOB_KUEUE_QUEUE")
    assert annotations.get("scheduling.volcano.sh/queue-name") == expected.get("PIXTRAIN_TRAINJOB_VOLCANO_QUEUE")
    assert manifest["spec"]["runtimeRef"]["name"] == expected["PIXTRAIN_TRAINJOB_RUNTIME"]


def test_unknown_gang_scheduler_fails_the_render():
    with pytest.raises(AssertionError, match="use none, kueue or volcano"):
        _render("trainJob.gangScheduling.scheduler=yunikorn")


def test_disabling_trainjobs_removes_their_objects():
    objects = _render("trainJob.enabled=false")
    names = {o["metadata"]["name"] for o in objects}
    assert (
        not {
            "pixtrain-run-worker-trainjobs",
            "allow-trainjob-peers",
            "pixtrain-trainjob-env",
            "pixtrain-trainjob-launcher",
            "allow-kube-api-egress-trainjob-launcher",
        }
        & names
    )
    assert helm_template(INFRA_CHART)  # and the default render still works


def test_the_launching_step_pod_gets_a_token_for_trainjobs_only_and_api_egress(infra_render):
    """Under the k8s executor the lora_training step runs in a step pod: for a multi-node run it needs the
    launcher account (token, TrainJob Role only) and the label the API-egress policy selects."""
    values_name, objects = infra_render
    config = trainjob_launcher_k8s_config(
        ExecutionSettings.from_env({}),
        TrainJobSettings.from_env(_one(objects, "ConfigMap", "pixtrain-trainjob-env")["data"]),
    )
    account = config["pod_spec_config"]["service_account_name"]
    assert _one(objects, "ServiceAccount", account)["automountServiceAccountToken"] is True
    bound = [b for b in objects if b["kind"] == "RoleBinding" and any(s["name"] == account for s in b["subjects"])]
    assert [b["roleRef"]["name"] for b in bound] == ["pixtrain-run-worker-trainjobs"]
    labels = config["pod_template_spec_metadata"]["labels"]
    assert labels.items() >= LAUNCHER_POD_LABELS.items()
    policy = _one(objects, "NetworkPolicy", "allow-kube-api-egress-trainjob-launcher")["spec"]
    assert policy["podSelector"] == {"matchLabels": dict(LAUNCHER_POD_LABELS)} and policy["policyTypes"] == ["Egress"]
    api_policy = _one(objects, "NetworkPolicy", "allow-kube-api-egress-daemon")["spec"]
    assert policy["egress"] == api_policy["egress"]  # the same API endpoints, nothing more
