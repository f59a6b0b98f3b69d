"""Dagster side of the gate policy (core/gate_policy.py): read the deployed limits in a gated step, refuse
launcher overrides, and write every gate decision with the thresholds it used into the audit trail."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import AssetCheckExecutionContext, AssetExecutionContext, Failure
from dagster._core.errors import DagsterInvalidPropertyError

from .core.gate_policy import GatePolicy, GatePolicyError, policy_override_in_tag

K8S_CONFIG_TAG = "dagster-k8s/config"


def deployed_policy(context: AssetExecutionContext | AssetCheckExecutionContext | None = None) -> GatePolicy:
    """The deployed gate policy of this step's process; fails when the run's tags try to replace it."""
    if context is not None and policy_override_in_tag(_run_tags(context).get(K8S_CONFIG_TAG)):
        raise Failure(
            description=(
                f"run tag {K8S_CONFIG_TAG} sets PIXTRAIN_GATE_* variables; gate limits come from the deployment only. "
                "Remove them from the tag; to change a limit, change gatePolicy in k8s/pixtrain-infra values."
            )
        )
    return GatePolicy.from_env()


def _run_tags(context: AssetExecutionContext | AssetCheckExecutionContext) -> Mapping[str, str]:
    context = getattr(context, "op_execution_context", context)  # an asset check's context wraps the op's
    try:
        return context.run.tags
    except DagsterInvalidPropertyError:  # a directly invoked asset (tests) has no run, hence no pod tags
        return {}


def resolve_or_fail(resolve):
    """Run ``resolve()`` (a policy lookup); a GatePolicyError becomes a step Failure with the same message."""
    try:
        return resolve()
    except GatePolicyError as error:
        raise Failure(description=str(error), metadata={"gate_policy_error": str(error)}) from error


def record_gate_decision(
    store: Any,
    who: Any,
    *,
    gate: str,
    passed: bool,
    thresholds: Mapping[str, Any],
    policy: GatePolicy,
    artifact_uri: str | None,
    artifact_sha256: str | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Append a ``gate_decision`` audit event: which gate, pass/fail, the thresholds applied and the deployed
    policy they were checked against. Idempotent per (gate, artifact, run, step, attempt)."""
    return store.append_audit_event(
        "gate_decision",
        actor=who.actor,
        artifact_uri=artifact_uri,
        artifact_sha256=artifact_sha256,
        run_id=who.run_id,
        step_key=who.step_key,
        idempotency_key=f"gate_decision:{gate}:{artifact_sha256}:{who.run_id}:{who.step_key}:{who.attempt}",
        details={
            "gate": gate,
            "passed": bool(passed),
            "thresholds": dict(thresholds),
            "deployed_policy": policy.to_dict(),
            **dict(extra or {}),
        },
    )
