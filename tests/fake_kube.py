"""An in-memory stand-in for the few Kubernetes API calls the TrainJob launcher makes (test scaffolding).

It keeps TrainJobs and pods as plain dicts, answers the CustomObjectsApi / CoreV1Api methods the launcher
calls with the same signatures, raises the real ``kubernetes.client.ApiException`` for API errors, and lets
a test script what the cluster does between polls (``on_poll``) and inject failures (``fail``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiException


class FakeCluster:
    def __init__(self) -> None:
        self.trainjobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[str]] = {}  # pod name -> "TIMESTAMP message" lines
        self.calls: list[str] = []
        self.log_requests: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        # method name -> list of exceptions to raise on its next calls (one per call, in order)
        self.failures: dict[str, list[BaseException]] = {}
        # called before each get of a TrainJob: the test's "controller"
        self.on_poll: Callable[[FakeCluster, int], None] = lambda cluster, n: None
        self.polls = 0

    def fail(self, method: str, *errors: BaseException) -> None:
        self.failures.setdefault(method, []).extend(errors)

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)

    # ---- the "controller" helpers a test uses ----

    def set_condition(self, namespace: str, name: str, type_: str, reason: str = "", message: str = "") -> None:
        status = self.trainjobs[(namespace, name)].setdefault("status", {})
        status.setdefault("conditions", []).append(
            {"type": type_, "status": "True", "reason": reason or type_, "message": message}
        )

    def add_pod(self, name: str, trainjob: str, rank: int, phase: str = "Pending", **status: Any) -> None:
        self.pods[name] = {
            "metadata": {
                "name": name,
                "labels": {
                    "jobset.sigs.k8s.io/jobset-name": trainjob,
                    "batch.kubernetes.io/job-completion-index": str(rank),
                },
            },
            "spec": {"nodeName": f"gpu-node-{rank}"},
            "status": {"phase": phase, **status},
        }

    # ---- CustomObjectsApi ----

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self._enter("create")
        name = body["metadata"]["name"]
        if (namespace, name) in self.trainjobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.trainjobs[(namespace, name)] = copy.deepcopy(body)
        return copy.deepcopy(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._enter("get")
        self.polls += 1
        self.on_poll(self, self.polls)
        if (namespace, name) not in self.trainjobs:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.trainjobs[(namespace, name)])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._enter("delete")
        if self.trainjobs.pop((namespace, name), None) is None:
            raise ApiException(status=404, reason="NotFound")
        self.deleted.append(name)
        for pod in [
            p for p, obj in self.pods.items() if obj["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"] == name
        ]:
            del self.pods[pod]
        return {"status": "Success"}

    # ---- CoreV1Api ----

    def list_namespaced_pod(self, namespace, label_selector="", **kwargs):
        self._enter("list_pods")
        key, _, value = label_selector.partition("=")
        items = [copy.deepcopy(p) for p in self.pods.values() if p["metadata"]["labels"].get(key) == value]
        return {"items": items}

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        self._enter("read_log")
        self.log_requests.append({"pod": name, **kwargs})
        lines = self.logs.get(name, [])
        return "".join(line + "\n" for line in lines)
