"""The TrainJob launcher's state machine (pixtrain_dagster/trainjob.py) against an in-memory Kubernetes API
(tests/fake_kube.py). The launcher is the real one; only the API server is replaced."""

from __future__ import annotations

import logging

import pytest
from kubernetes.client import ApiException

from pixtrain_dagster.core.backoff import Backoff
from pixtrain_dagster.execution import ExecutionSettings
from pixtrain_dagster.trainjob import (
    KubeApis,
    Phase,
    TrainJobError,
    build_trainjob,
    log_stamp_key,
    run_trainjob,
    trainjob_name,
)

from fake_kube import FakeCluster

NS = "pixtrain"


class Recorder:
    """Stands in for the Dagster log (context.log has the same info/warning/error methods)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.records.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.records.append(("warning", msg))

    def error(self, msg: str) -> None:
        self.records.append(("error", msg))

    def text(self, level: str | None = None) -> str:
        return "\n".join(m for lvl, m in self.records if level in (None, lvl))


@pytest.fixture
def manifest():
    settings = ExecutionSettings.from_env({})
    return build_trainjob(
        name=trainjob_name("4f0c2a9e-run", "lora_training"),
        request_uri="/data/artifacts/r.json",
        num_nodes=2,
        gpus_per_node=8,
        image="registry.example.com/pixtrain:1",
        settings=settings,
    )


def launch(cluster: FakeCluster, manifest, **kwargs):
    sleeps: list[float] = []
    log = Recorder()
    kwargs.setdefault("retry", Backoff(max_attempts=4, initial_delay_s=1, max_delay_s=4))
    outcome = run_trainjob(KubeApis(cluster, cluster), manifest, NS, log, poll_seconds=5, sleep=sleeps.append, **kwargs)
    return outcome, log, sleeps


def test_created_running_succeeded_streams_rank0_logs_once_and_keeps_the_trainjob(manifest):
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]

    def controller(c: FakeCluster, poll: int) -> None:
        if poll == 2:  # pods scheduled, starting
            c.add_pod(f"{name}-node-0-0-abcde", name, 0, "Pending")
            c.add_pod(f"{name}-node-0-1-fghij", name, 1, "Pending")
        if poll == 3:
            for pod in c.pods.values():
                pod["status"]["phase"] = "Running"
            c.logs[f"{name}-node-0-0-abcde"] = [
                "2026-12-03T09:00:00.1Z step 1 loss 2.5",
                "2026-12-03T09:00:00.12Z step 2 loss 2.4",
            ]
            c.logs[f"{name}-node-0-1-fghij"] = ["2026-12-03T09:00:00.1Z rank 1 says hi"]
        if poll == 4:  # the next read overlaps the previous one: nothing may be repeated
            c.logs[f"{name}-node-0-0-abcde"].append("2026-12-03T09:00:01Z step 3 loss 2.3")
        if poll == 5:
            c.logs[f"{name}-node-0-0-abcde"].append("2026-12-03T09:00:02.000000001Z saved adapter")
            c.set_condition(NS, name, "Complete", "JobsCompleted")
            for pod in c.pods.values():
                pod["status"]["phase"] = "Succeeded"

    cluster.on_poll = controller
    outcome, log, sleeps = launch(cluster, manifest)

    assert outcome.phase is Phase.SUCCEEDED
    assert outcome.transitions == [Phase.CREATED, Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED]
    streamed = [m for lvl, m in log.records if m.startswith("[rank 0]")]
    assert streamed == [
        "[rank 0] step 1 loss 2.5",
        "[rank 0] step 2 loss 2.4",
        "[rank 0] step 3 loss 2.3",
        "[rank 0] saved adapter",
    ]
    assert "rank 1 says hi" not in log.text()
    assert all(r["container"] == "node" and r["timestamps"] for r in cluster.log_requests)
    # The first read takes the whole log; later ones a window since the last read (then dropped by timestamp).
    assert "since_seconds" not in cluster.log_requests[0] and cluster.log_requests[1]["since_seconds"] >= 5
    assert not cluster.deleted and (NS, name) in cluster.trainjobs  # kept: the result is read after success
    assert sleeps == [5, 5, 5, 5]


def test_failed_with_oomkilled_and_evicted_pods_reports_reasons_and_deletes(manifest):
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]

    def controller(c: FakeCluster, poll: int) -> None:
        if poll == 1:
            c.add_pod("p0", name, 0, "Running")
            c.add_pod("p1", name, 1, "Running")
        if poll == 2:
            c.pods["p1"]["status"] = {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "node", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": ""}}}
                ],
            }
            c.pods["p0"]["status"] = {
                "phase": "Failed",
                "reason": "Evicted",
                "message": "The node was low on resource: memory.",
            }
            c.set_condition(NS, name, "Failed", "JobSetFailed", "jobset node failed")

    cluster.on_poll = controller
    outcome, log, _ = launch(cluster, manifest)

    assert outcome.phase is Phase.FAILED
    reasons = {(p.pod, p.reason, p.exit_code) for p in outcome.problems}
    assert reasons == {("p1", "OOMKilled", 137), ("p0", "Evicted", None)}
    assert "OOMKilled (exit code 137)" in outcome.message and "on node gpu-node-1" in outcome.message
    assert "The node was low on resource: memory." in log.text("warning")
    assert cluster.deleted == [name]


def test_image_pull_backoff_and_lost_node_are_reported_while_waiting(manifest):
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]

    def controller(c: FakeCluster, poll: int) -> None:
        if poll == 1:
            c.add_pod(
                "p0",
                name,
                0,
                "Pending",
                containerStatuses=[
                    {
                        "name": "node",
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": "Back-off pulling image registry.example.com/pixtrain:1",
                            }
                        },
                    }
                ],
            )
            c.add_pod("p1", name, 1, "Unknown")
        if poll == 4:
            c.set_condition(NS, name, "Failed", "JobSetFailed")

    cluster.on_poll = controller
    outcome, log, _ = launch(cluster, manifest)
    warnings = [m for lvl, m in log.records if lvl == "warning"]
    # Each problem is logged once, not once per poll.
    assert sum("ImagePullBackOff" in w for w in warnings) == 1
    assert sum("NodeLost" in w for w in warnings) == 1
    assert {p.reason for p in outcome.problems} == {"ImagePullBackOff", "NodeLost"}
    assert outcome.phase is Phase.FAILED and cluster.deleted == [name]


def test_run_terminated_deletes_the_trainjob(manifest):
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]
    cluster.on_poll = lambda c, n: c.add_pod("p0", name, 0, "Running") if n == 1 else None
    cancel_after = iter([False, False, True])
    outcome, log, _ = launch(cluster, manifest, should_cancel=lambda: next(cancel_after))
    assert outcome.phase is Phase.CANCELLED and outcome.deleted
    assert cluster.deleted == [name] and not cluster.trainjobs and not cluster.pods


def test_step_interrupted_deletes_the_trainjob_and_reraises(manifest):
    """Dagster interrupts a terminated step's process (an exception inside whatever call is running)."""
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]

    class Interrupted(BaseException):  # like DagsterExecutionInterruptedError, not an Exception
        pass

    def sleep(_seconds: float) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        run_trainjob(KubeApis(cluster, cluster), manifest, NS, Recorder(), sleep=sleep)
    assert cluster.deleted == [name]


def test_timeout_deletes_the_trainjob(manifest):
    cluster = FakeCluster()
    now = iter(range(0, 10_000, 100))
    outcome, _, _ = launch(cluster, manifest, timeout_s=250, clock=lambda: float(next(now)))
    assert outcome.phase is Phase.TIMED_OUT and cluster.deleted == [manifest["metadata"]["name"]]


def test_transient_api_errors_are_retried_with_backoff_within_bounds(manifest):
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]
    cluster.fail("create", ApiException(status=503, reason="Service Unavailable"), ConnectionResetError(104, "reset"))
    cluster.fail(
        "get",
        ApiException(status=429, reason="Too Many Requests"),
        ApiException(status=500, reason="Internal Server Error"),
    )
    cluster.on_poll = lambda c, n: c.set_condition(NS, name, "Complete") if n == 1 else None
    outcome, log, sleeps = launch(cluster, manifest)
    assert outcome.phase is Phase.SUCCEEDED
    assert cluster.calls.count("create") == 3 and cluster.calls.count("get") == 3
    assert sleeps == [1, 2, 1, 2]  # exponential backoff per call, reset for each new call
    assert len([m for lvl, m in log.records if lvl == "warning" and "transient" in m]) == 4


def test_retries_stop_at_the_bound_and_the_trainjob_is_deleted(manifest):
    cluster = FakeCluster()
    cluster.fail("get", *[ApiException(status=502, reason="Bad Gateway") for _ in range(4)])
    with pytest.raises(TrainJobError, match="still failing after 4 attempts"):
        launch(cluster, manifest)
    assert cluster.calls.count("get") == 4
    assert cluster.deleted == [manifest["metadata"]["name"]]


def test_a_rejected_manifest_is_not_retried(manifest):
    cluster = FakeCluster()
    cluster.fail("create", ApiException(status=422, reason="Unprocessable Entity"))
    with pytest.raises(TrainJobError, match="answered 422"):
        launch(cluster, manifest)
    assert cluster.calls.count("create") == 1 and not cluster.trainjobs


def test_a_create_whose_answer_was_lost_is_adopted(manifest):
    """The first create reached the server but the connection dropped; the retry gets 409 and follows it."""
    cluster = FakeCluster()
    name = manifest["metadata"]["name"]
    original = cluster.create_namespaced_custom_object

    def create_then_reset(*args, **kwargs):
        cluster.create_namespaced_custom_object = original
        original(*args, **kwargs)
        raise ConnectionResetError(104, "Connection reset by peer")

    cluster.create_namespaced_custom_object = create_then_reset
    cluster.on_poll = lambda c, n: c.set_condition(NS, name, "Complete")
    outcome, log, _ = launch(cluster, manifest)
    assert outcome.phase is Phase.SUCCEEDED and "already exists" in log.text()


def test_trainjob_names_are_dns_labels_and_differ_per_attempt():
    a, b = trainjob_name("4F0C2A9E_xyz", "lora_training", 0), trainjob_name("4F0C2A9E_xyz", "lora_training", 1)
    assert a != b and a == trainjob_name("4F0C2A9E_xyz", "lora_training", 0)
    assert a.startswith("pixtrain-4f0c2a9e-") and len(a) <= 40


def test_log_timestamps_order_with_trimmed_fractions():
    stamps = [
        "2026-12-03T09:00:00Z",
        "2026-12-03T09:00:00.1Z",
        "2026-12-03T09:00:00.12Z",
        "2026-12-03T09:00:00.999999999Z",
        "2026-12-03T09:00:01Z",
    ]
    assert sorted(stamps, key=log_stamp_key) == stamps
    assert sorted(stamps) != stamps  # plain string order would get this wrong


def test_logging_logger_is_accepted(manifest, caplog):
    cluster = FakeCluster()
    cluster.on_poll = lambda c, n: c.set_condition(NS, manifest["metadata"]["name"], "Complete")
    with caplog.at_level(logging.INFO):
        outcome = run_trainjob(KubeApis(cluster, cluster), manifest, NS, logging.getLogger("t"), sleep=lambda s: None)
    assert outcome.succeeded and "succeeded" in caplog.text


def test_a_non_api_error_keeps_its_type_and_still_deletes_the_trainjob(manifest):
    cluster = FakeCluster()
    cluster.fail("list_pods", TypeError("unexpected keyword"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        launch(cluster, manifest)
    assert cluster.calls.count("list_pods") == 1 and cluster.deleted == [manifest["metadata"]["name"]]
