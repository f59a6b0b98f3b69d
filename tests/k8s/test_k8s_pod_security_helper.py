"""The restricted-profile checker must accept a hardened pod and reject each kind of unhardened one;
otherwise every "no violations" assertion elsewhere would prove nothing."""

from __future__ import annotations

import copy

import pytest

from .pod_security import pod_spec_of, violations

HARDENED_POD = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1001, "seccompProfile": {"type": "RuntimeDefault"}},
    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
    "containers": [
        {
            "name": "main",
            "image": "img",
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
        }
    ],
}


def _mutated(path: list, value) -> dict:
    pod = copy.deepcopy(HARDENED_POD)
    node = pod
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return pod


def test_hardened_pod_conforms():
    assert violations(HARDENED_POD) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["hostNetwork"], True, "hostNetwork"),
        (["hostPID"], True, "hostPID"),
        (["volumes", 0], {"name": "host", "hostPath": {"path": "/"}}, "hostPath"),
        (["securityContext", "runAsNonRoot"], KeyError, "runAsNonRoot must be true"),
        (["securityContext", "runAsUser"], 0, "runAsUser must not be 0"),
        (["securityContext", "seccompProfile", "type"], "Unconfined", "seccompProfile"),
        (["securityContext", "sysctls"], [{"name": "kernel.msgmax", "value": "1"}], "sysctl kernel.msgmax"),
        (["containers", 0, "securityContext", "allowPrivilegeEscalation"], KeyError, "allowPrivilegeEscalation"),
        (["containers", 0, "securityContext", "privileged"], True, "privileged"),
        (["containers", 0, "securityContext", "capabilities"], {"drop": ["NET_RAW"]}, "drop must include ALL"),
        (["containers", 0, "securityContext", "capabilities", "add"], ["SYS_ADMIN"], "SYS_ADMIN"),
        (["containers", 0, "securityContext", "runAsNonRoot"], False, "runAsNonRoot must be true"),
        (["containers", 0, "securityContext", "procMount"], "Unmasked", "procMount"),
        (["containers", 0, "ports"], [{"containerPort": 80, "hostPort": 80}], "hostPort"),
    ],
)
def test_each_rule_rejects_its_violation(path, value, expected):
    found = violations(_mutated(path, value))
    assert any(expected in finding for finding in found), found


def test_init_containers_are_checked_too():
    pod = copy.deepcopy(HARDENED_POD)
    pod["initContainers"] = [{"name": "wait", "image": "busybox"}]
    assert any("initContainers[wait]" in finding for finding in violations(pod))


def test_net_bind_service_is_the_only_addable_capability():
    pod = _mutated(["containers", 0, "securityContext", "capabilities", "add"], ["NET_BIND_SERVICE"])
    assert violations(pod) == []


def test_pod_specs_are_found_in_every_workload_kind():
    spec = {"containers": []}
    assert pod_spec_of({"kind": "Pod", "spec": spec}) is spec
    assert pod_spec_of({"kind": "Job", "spec": {"template": {"spec": spec}}}) is spec
    assert pod_spec_of({"kind": "Deployment", "spec": {"template": {"spec": spec}}}) is spec
    assert pod_spec_of({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": spec}}}}}) is spec
    assert pod_spec_of({"kind": "ConfigMap"}) is None
