"""Pod Security Standards, "restricted" profile (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
as a checker for pod specs in Kubernetes API form (camelCase dicts, as `helm template` or
`ApiClient.sanitize_for_serialization` produce them).

There is no API server here to run Pod Security admission, so its rules are encoded once, below, and
applied to every pod the project can create. `restricted` is `baseline` plus the hardening rules; both
sets are checked. `violations()` returns readable findings instead of raising, so a test can show all of
them at once and the helper's own tests can check that each rule fires.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Volume types allowed by "restricted" (everything else, notably hostPath, is rejected).
ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# Sysctls allowed by "baseline".
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
# Capabilities that "baseline" allows to be added; "restricted" allows only NET_BIND_SERVICE.
RESTRICTED_ADDABLE_CAPABILITIES = {"NET_BIND_SERVICE"}
ALLOWED_SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
_VOLUME_META_KEYS = {"name"}


def _containers(pod_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod_spec.get(field) or []:
            yield f"{field}[{container.get('name', '?')}]", container


def violations(pod_spec: dict[str, Any]) -> list[str]:
    """Every way ``pod_spec`` breaks the restricted profile; an empty list means it conforms."""
    found: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}

    # ---- baseline ----
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            found.append(f"pod: {field} must not be true")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        found.append("pod: windowsOptions.hostProcess must not be true")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl.get('name')} is not in the safe set")
    if pod_sc.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        found.append("pod: appArmorProfile must be RuntimeDefault or Localhost")
    if pod_sc.get("seLinuxOptions", {}).get("type") not in (
        None,
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
    ):
        found.append("pod: seLinuxOptions.type is not allowed")

    # ---- restricted: volumes ----
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - _VOLUME_META_KEYS
        bad = kinds - ALLOWED_VOLUME_TYPES
        if bad:
            found.append(f"volume {volume.get('name')}: type {sorted(bad)} is not allowed")

    # ---- restricted: non-root, seccomp (pod level may satisfy them for all containers) ----
    pod_non_root = pod_sc.get("runAsNonRoot")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_non_root is False:
        found.append("pod: runAsNonRoot must not be false")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod: runAsUser must not be 0")
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP_TYPES:
        found.append(f"pod: seccompProfile.type {pod_seccomp} is not allowed")

    for where, container in _containers(pod_spec):
        sc = container.get("securityContext") or {}
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}: hostPort must not be set")
        if sc.get("privileged"):
            found.append(f"{where}: privileged must not be true")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where}: procMount must be Default")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", pod_non_root)
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot must be true (on the container or the pod)")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ALLOWED_SECCOMP_TYPES:
            found.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (got {seccomp})")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}: capabilities.drop must include ALL")
        added = set(capabilities.get("add") or []) - RESTRICTED_ADDABLE_CAPABILITIES
        if added:
            found.append(f"{where}: capabilities.add {sorted(added)} is not allowed")
    return found


# ---- finding the pod specs in any workload object ----------------------------------------------------------

_POD_TEMPLATE_PATHS = {
    "Pod": ("spec",),
    "Job": ("spec", "template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a workload object, or None for objects that create no pods."""
    path = _POD_TEMPLATE_PATHS.get(obj.get("kind", ""))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node[key]
    return node
