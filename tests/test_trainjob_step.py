"""The Dagster side of multi-node training (pixtrain_dagster/trainjob_step.py), run inside a real asset
materialization, with the in-memory Kubernetes API of tests/fake_kube.py standing in for the cluster."""

from __future__ import annotations

from dagster import DagsterInstance, Failure, asset, materialize

from pixtrain_dagster.trainjob import KubeApis
from pixtrain_dagster.trainjob_step import launch_multinode_training

from fake_kube import FakeCluster

ENV = {"PIXTRAIN_IMAGE": "registry.example.com/pixtrain:1", "PIXTRAIN_K8S_NAMESPACE": "pixtrain"}


def _materialize(cluster: FakeCluster, seen: dict):
    @asset
    def lora_training(context):
        try:
            outcome = launch_multinode_training(
                context,
                request_uri="/data/artifacts/req.json",
                num_nodes=2,
                gpus_per_node=8,
                poll_seconds=0.01,
                apis=KubeApis(cluster, cluster),
                environ=ENV,
            )
            seen["outcome"] = outcome
        except Failure as failure:
            seen["failure"] = failure
            raise
        return 1

    with DagsterInstance.ephemeral() as instance:
        return materialize([lora_training], instance=instance, raise_on_error=False)


def test_the_step_runs_the_trainjob_and_returns_when_it_succeeds():
    cluster = FakeCluster()

    def controller(c: FakeCluster, poll: int) -> None:
        ((ns, name),) = c.trainjobs
        if poll == 1:
            c.add_pod("p0", name, 0, "Running")
            c.logs["p0"] = ["2026-12-03T09:00:00Z epoch 0 loss 1.9"]
        if poll == 2:
            c.set_condition(ns, name, "Complete")

    cluster.on_poll = controller
    seen: dict = {}
    result = _materialize(cluster, seen)
    assert result.success
    ((namespace, name),) = cluster.trainjobs
    body = cluster.trainjobs[(namespace, name)]
    assert namespace == "pixtrain" and body["spec"]["trainer"]["image"] == "registry.example.com/pixtrain:1"
    assert body["metadata"]["labels"]["dagster/run-id"] == result.run_id
    assert seen["outcome"].succeeded and seen["outcome"].log_lines == 1


def test_a_failed_trainjob_fails_the_step_with_the_pod_reasons():
    cluster = FakeCluster()

    def controller(c: FakeCluster, poll: int) -> None:
        ((ns, name),) = c.trainjobs
        c.add_pod("p1", name, 1, "Failed", reason="Evicted", message="node drained")
        c.set_condition(ns, name, "Failed", "JobSetFailed")

    cluster.on_poll = controller
    seen: dict = {}
    result = _materialize(cluster, seen)
    assert not result.success
    failure = seen["failure"]
    assert "failed" in failure.description and "Evicted" in failure.description
    assert "node drained" in failure.metadata["pod_problems"].value
    assert cluster.deleted and not cluster.trainjobs
