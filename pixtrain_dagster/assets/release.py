"""The promoted adapter: the one in use, published with its model card only after every gate passed."""

import json

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    DagsterInstance,
    Failure,
    MetadataValue,
    Output,
    asset,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from ..catalog import PHI_DERIVED, governance_tags, owners, uri_metadata
from ..core.gate_policy import GatePolicy, GatePolicyError
from ..execution import METADATA_DB_PASSWORD_ENV, step_pod_tags
from ..gates import deployed_policy
from ..resources import ArtifactStoreResource, TrainingMetadataResource
from ..resources.metadata import step_identity

CURRENT_POINTER = "promoted/CURRENT.json"


def run_trigger(tags: dict) -> str:
    """What started the run, for the audit trail: our trigger tag, a sensor, a schedule, automation, or a person."""
    if trigger := tags.get("pixtrain/trigger"):
        return trigger
    for tag, kind in (("dagster/sensor_name", "sensor"), ("dagster/schedule_name", "schedule")):
        if tags.get(tag):
            return f"{kind}:{tags[tag]}"
    if any(tag.startswith("dagster/from_automation_condition") or tag == "dagster/auto_materialize" for tag in tags):
        return "automation"
    return "manual"


def gate_thresholds_used(adapter_evaluation: dict, bias_report: dict) -> dict:
    """The thresholds the two model gates applied to this adapter, as they recorded them."""
    bias_thresholds = dict(bias_report.get("verdict", {}).get("thresholds") or {})
    if "max_templates" in bias_report:
        bias_thresholds["max_templates"] = bias_report["max_templates"]
    return {
        "training_sanity": dict(adapter_evaluation.get("training_sanity", {}).get("thresholds") or {}),
        "bias_gate": bias_thresholds,
    }


def looser_than_policy(used: dict, policy: GatePolicy) -> list[str]:
    """Gate thresholds that were looser than ``policy`` (e.g. the policy was tightened after the gates ran)."""
    problems = []
    checks = [
        ("training_sanity", "max_perplexity_increase", lambda v: policy.numeric("max_perplexity_increase", v)),
        ("bias_gate", "min_ratio", lambda v: policy.numeric("bias_min_ratio", v, field="min_ratio")),
        ("bias_gate", "max_regression", lambda v: policy.numeric("bias_max_regression", v, field="max_regression")),
        ("bias_gate", "metrics", lambda v: policy.gated_metrics(v, field="gated_metrics")),
        ("bias_gate", "require_significance", policy.require_significance),
    ]
    for gate, name, check in checks:
        value = used.get(gate, {}).get(name)
        if value is None:
            problems.append(f"{gate} recorded no {name}; materialise it again")
            continue
        try:
            check(value)
        except GatePolicyError as error:
            problems.append(f"{gate}: {error}")
    return problems


def promotion_blockers(
    lora_adapter: dict, adapter_evaluation: dict, bias_report: dict, policy: GatePolicy | None = None
) -> list[str]:
    """Why this adapter must not be promoted; empty when every gate passed for exactly this adapter.

    Dagster's blocking checks already stop a run before this step; this second look covers runs that select
    the promotion alone, where an older failed check would otherwise go unnoticed.
    """
    sha = lora_adapter["sha256"]
    blockers = []
    if adapter_evaluation.get("adapter_sha256") != sha:
        blockers.append("adapter_evaluation was computed for a different adapter; materialise it again")
    elif adapter_evaluation.get("training_sanity", {}).get("problems"):
        blockers.append("training_sanity failed: " + "; ".join(adapter_evaluation["training_sanity"]["problems"]))
    if bias_report.get("adapter_sha256") != sha:
        blockers.append("bias_report was computed for a different adapter; materialise it again")
    elif not bias_report["verdict"]["passed"]:
        blockers.append("bias_gate failed: " + bias_report["verdict"]["summary"])
    if policy is not None and not blockers:
        blockers += looser_than_policy(gate_thresholds_used(adapter_evaluation, bias_report), policy)
    return blockers


# Every blocking check upstream of the promotion: the dataset's (two steps up, which the automation condition's
# all_deps_blocking_checks_passed does not look at) and the two model gates.
GATE_CHECKS = (
    *(AssetCheckKey(AssetKey("training_dataset"), name) for name in ("schema_valid", "no_phi_left", "enough_rows")),
    AssetCheckKey(AssetKey("adapter_evaluation"), "training_sanity"),
    AssetCheckKey(AssetKey("bias_report"), "bias_gate"),
)


def failed_gate_checks(instance: DagsterInstance) -> list[str]:
    """Gates whose latest evaluation failed, e.g. a re-check after a rule change (recheck_gates) that found a
    problem in data the adapter was trained on: promoting alone must not get past it."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(GATE_CHECKS))
    return [
        f"the latest {key.name} check on {key.asset_key.to_user_string()} failed (run {record.run_id}); fix the "
        "cause and run the check again (recheck_gates)"
        for key, record in latest.items()
        if record.status == AssetCheckExecutionRecordStatus.FAILED
    ]


def model_card(lora_adapter: dict, adapter_evaluation: dict, bias: dict, limitations: str) -> str:
    training = lora_adapter["training"]
    return "\n".join(
        [
            "---",
            "library_name: peft",
            "tags: [lora, therapy-client-simulation, pixtrain]",
            "---",
            "# pixtrain LoRA adapter",
            "",
            "Simulated therapy client for clinician training (the model speaks as the client).",
            "",
            "## Provenance",
            f"- adapter sha256: `{lora_adapter['sha256']}`",
            f"- base model snapshot sha256: `{lora_adapter['base_model_sha256']}`",
            f"- dataset version (curated) sha256: `{lora_adapter['dataset_sha256']}`",
            f"- training fingerprint: `{lora_adapter['fingerprint']}`, {training['final_step']} steps on "
            f"{training['device']} ({training['precision']})",
            "",
            "## Evaluation (held-out split)",
            f"- validation loss base {adapter_evaluation['base']['loss']:.4f} -> adapter "
            f"{adapter_evaluation['adapter']['loss']:.4f}",
            f"- perplexity base {adapter_evaluation['base']['perplexity']:.2f} -> adapter "
            f"{adapter_evaluation['adapter']['perplexity']:.2f}",
            "",
            "## Bias, Risks and Limitations",
            limitations,
            "",
            f"Bias gate: **{bias['verdict']['status']}** ({bias['verdict']['summary']}); full report: `{bias['uri']}`.",
        ]
    )


@asset(
    group_name="release",
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    kinds={"huggingface", "postgres"},  # a PEFT folder with its model card; the promotion is an audit event
    owners=owners(),
    tags=governance_tags(PHI_DERIVED, "cpu"),
    automation_condition=AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed(),
)
def promoted_adapter(
    context: AssetExecutionContext,
    lora_adapter: dict,
    adapter_evaluation: dict,
    bias_report: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
) -> Output[dict]:
    """The adapter in use: its files plus a model card, and `promoted/CURRENT.json` pointing at it."""
    from ..core.bias import limitations_markdown

    policy = deployed_policy(context)
    blockers = promotion_blockers(lora_adapter, adapter_evaluation, bias_report, policy)
    blockers += failed_gate_checks(context.instance)
    if blockers:
        who = step_identity(context)
        training_metadata.get_store().append_audit_event(
            "promotion_refused",
            actor=who.actor,
            artifact_uri=lora_adapter.get("uri"),
            artifact_sha256=lora_adapter["sha256"],
            run_id=who.run_id,
            step_key=who.step_key,
            idempotency_key=f"promotion_refused:{lora_adapter['sha256']}:{who.run_id}:{who.attempt}",
            details={
                "blockers": blockers,
                "gate_thresholds": gate_thresholds_used(adapter_evaluation, bias_report),
                "deployed_policy": policy.to_dict(),
            },
        )
        raise Failure(
            description="adapter not promoted: " + " | ".join(blockers),
            metadata={"adapter_sha256": lora_adapter["sha256"]},
        )
    store = artifact_store.store()
    if store.ref(lora_adapter["key"]).sha256 != lora_adapter["sha256"]:
        raise Failure(
            description=f"adapter at {lora_adapter['uri']} changed since it was gated (retrained by a "
            "later run); materialise adapter_evaluation and bias_report again"
        )
    report = json.loads((store.local_path(bias_report["key"]) / "bias_report.json").read_text())
    card = model_card(lora_adapter, adapter_evaluation, bias_report, limitations_markdown(report))
    adapter_dir = store.local_path(lora_adapter["key"])
    with store.stage() as folder:
        for path in adapter_dir.iterdir():
            if path.is_file() and path.name != "MANIFEST.json":
                (folder / path.name).write_bytes(path.read_bytes())
        (folder / "README.md").write_text(card)
        ref = store.publish(folder, f"promoted/{lora_adapter['sha256'][:16]}", replace=True)
    promotion = {
        "key": store.key_of(ref.uri),
        **ref.to_dict(),
        "adapter_sha256": lora_adapter["sha256"],
        "run_id": context.run.run_id,
        "trigger": run_trigger(context.run.tags),
    }
    who = step_identity(context)
    training_metadata.get_store().append_audit_event(
        "adapter_promoted",
        actor=who.actor,
        artifact_uri=ref.uri,
        artifact_sha256=lora_adapter["sha256"],
        run_id=who.run_id,
        step_key=who.step_key,
        idempotency_key=f"adapter_promoted:{lora_adapter['sha256']}:{who.run_id}",
        details={
            "trigger": promotion["trigger"],
            "bias_verdict": bias_report["verdict"]["status"],
            "evaluation_uri": adapter_evaluation["uri"],
            "bias_report_uri": bias_report["uri"],
            "gate_thresholds": gate_thresholds_used(adapter_evaluation, bias_report),
            "deployed_policy": policy.to_dict(),
        },
    )
    store.put_json(CURRENT_POINTER, promotion)  # atomic switch: readers see the old or the new adapter
    return Output(
        promotion,
        metadata={
            "adapter_sha256": lora_adapter["sha256"],
            **uri_metadata(ref.uri),
            "model_card": MetadataValue.md(card),
            "trigger": promotion["trigger"],
        },
    )
