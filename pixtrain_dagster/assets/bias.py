"""Bias report: counterfactual probes on the base model and the adapter, with the blocking bias gate."""

import json

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AutomationCondition,
    Config,
    MetadataValue,
    Output,
    asset,
    asset_check,
)
from pydantic import Field

from ..catalog import PHI_DERIVED, governance_tags, owners, uri_metadata
from ..core.bias import BiasSettings, BiasThresholds
from ..core.gate_policy import GatePolicy
from ..execution import METADATA_DB_PASSWORD_ENV, step_pod_tags
from ..gates import deployed_policy, record_gate_decision, resolve_or_fail
from ..recovery import GPU_POOL, gpu_step_retry_policy
from ..resources import ArtifactStoreResource, BiasDetectionClient, TrainingMetadataResource, TrainingRuntimeResource
from ..resources.metadata import step_identity

_SETTINGS = BiasSettings()


class BiasReportConfig(Config):
    max_templates: int | None = Field(
        default=_SETTINGS.max_templates, ge=1, description="Probe templates scored; None = all."
    )
    generation_templates: int = Field(
        default=_SETTINGS.generation_templates, ge=0, description="Templates whose replies are generated (slow on CPU)."
    )
    max_new_tokens: int = Field(default=_SETTINGS.max_new_tokens, ge=1, description="Length of each generated reply.")
    # Gate thresholds: unset = the deployed limit (PIXTRAIN_GATE_BIAS_*, core/gate_policy.py); a run may only
    # tighten them. max_templates is checked too: fewer templates than deployed weaken the gate.
    min_ratio: float | None = Field(
        default=None, gt=0, le=1, description="Four-fifths rule; only values >= the deployed one are accepted."
    )
    max_regression: float | None = Field(
        default=None,
        ge=0,
        description="Largest allowed impact-ratio drop of a group against the base model; only <= deployed.",
    )
    gated_metrics: list[str] | None = Field(
        default=None, description="Metrics that can fail the gate (others only warn); may only add to deployed."
    )
    require_significance: bool | None = Field(
        default=None,
        description="Fail only when the whole 95% interval is past the threshold; True only when "
        "the deployment allows it.",
    )
    bootstrap_resamples: int = Field(
        default=_SETTINGS.bootstrap_resamples,
        ge=100,
        description="Resamples for the 95% intervals (cluster bootstrap over templates).",
    )
    seed: int = Field(default=_SETTINGS.seed, description="Seed of the bootstrap and of any sampling.")

    def to_settings(self, policy: GatePolicy | None = None) -> BiasSettings:
        """Settings with thresholds checked against ``policy`` (default: the deployed one); raises
        GatePolicyError when a field is looser than deployed."""
        policy = policy or GatePolicy.from_env()
        return BiasSettings(
            max_templates=policy.bias_templates(self.max_templates),
            generation_templates=self.generation_templates,
            max_new_tokens=self.max_new_tokens,
            bootstrap_resamples=self.bootstrap_resamples,
            seed=self.seed,
            thresholds=BiasThresholds(
                min_ratio=policy.numeric("bias_min_ratio", self.min_ratio, field="min_ratio"),
                max_regression=policy.numeric("bias_max_regression", self.max_regression, field="max_regression"),
                metrics=policy.gated_metrics(self.gated_metrics),
                require_significance=policy.require_significance(self.require_significance),
                fail_on_previous_regression=policy.bias_fail_on_previous_regression,
            ),
        )


def _previous_report(context: AssetExecutionContext, store) -> dict | None:
    """The last materialised bias report, to report the change against the previous adapter."""
    event = context.instance.get_latest_materialization_event(AssetKey("bias_report"))
    if event is None or "report_uri" not in event.asset_materialization.metadata:
        return None
    try:
        uri = event.asset_materialization.metadata["report_uri"].value
        return json.loads((store.local_path(store.key_of(uri)) / "bias_report.json").read_text())
    except Exception as error:  # a missing or foreign old report must not block a new one
        context.log.warning(f"previous bias report not readable ({error}); comparing with the base model only")
        return None


@asset(
    group_name="evaluation",
    op_tags=step_pod_tags("gpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    pool=GPU_POOL,
    retry_policy=gpu_step_retry_policy(),
    automation_condition=AutomationCondition.eager(),
    kinds={"pytorch", "huggingface", "json"},
    owners=owners(),
    tags=governance_tags(PHI_DERIVED, "gpu"),  # synthetic probes, but the replies come from the adapter
)
def bias_report(
    context: AssetExecutionContext,
    config: BiasReportConfig,
    base_model: dict,
    lora_adapter: dict,
    artifact_store: ArtifactStoreResource,
    training_runtime: TrainingRuntimeResource,
    bias_detection: BiasDetectionClient,
    training_metadata: TrainingMetadataResource,
):
    """Counterfactual probes across demographic axes, scored on the base model and on the adapter.

    Per axis and group: likelihood of a supportive reply and sentiment of the model's own reply, gaps with
    bootstrap 95% intervals, four-fifths impact ratios, and the change against the base and previous adapter.
    """
    from ..core.bias import render_markdown, run_bias_report
    from ..core.models import pick_device
    from ..core.telemetry import StepTelemetry, serve_step_metrics

    # Before any work: a run that asks for a looser gate than deployed fails here, naming the field.
    policy = deployed_policy(context)
    settings = resolve_or_fail(lambda: config.to_settings(policy))
    store = artifact_store.store()
    # /metrics (process and GPU gauges) while the step runs; docs/monitoring.md.
    with serve_step_metrics(StepTelemetry("bias_report", base_model["info"]["source_reference"])):
        report = run_bias_report(
            base_snapshot_dir=store.local_path(base_model["key"]),
            adapter_dir=store.local_path(lora_adapter["key"]),
            settings=settings,
            device=pick_device(training_runtime.device),
            previous_report=_previous_report(context, store),
        )
    report["adapter_sha256"] = lora_adapter["sha256"]
    report["base_model_sha256"] = base_model["sha256"]
    if bias_detection.configured:
        report["external_assessment"] = bias_detection.assess(report)
    markdown = render_markdown(report)
    with store.stage() as folder:
        (folder / "bias_report.json").write_text(json.dumps(report, indent=2))
        (folder / "bias_report.md").write_text(f"# Bias report\n\n{markdown}\n")
        ref = store.publish(folder, f"bias-reports/{lora_adapter['sha256'][:16]}", replace=True)
    verdict = report["verdict"]
    # Fail closed: a configured service must answer {"passed": true}; anything else blocks promotion.
    external_passed = not bias_detection.configured or report["external_assessment"].get("passed") is True
    who = step_identity(context)
    training_metadata.get_store().record_evaluation(
        who.run_id,
        who.step_key,
        adapter_sha256=lora_adapter["sha256"],
        eval_name="bias_report",
        metrics={
            "verdict": verdict["status"],
            "failures": len(verdict["failures"]),
            "report_uri": ref.uri,
            "probe_set_sha256": report["probe_set"]["sha256"],
        },
        passed=bool(verdict["passed"] and external_passed),
    )
    value = {
        "key": store.key_of(ref.uri),
        **ref.to_dict(),
        "adapter_sha256": lora_adapter["sha256"],
        "verdict": verdict,
        "probe_set_sha256": report["probe_set"]["sha256"],
        "max_templates": settings.max_templates,
    }
    return Output(
        value,
        metadata={
            "verdict": verdict["status"],
            "probe_set_sha256": report["probe_set"]["sha256"],
            "failures": MetadataValue.int(len(verdict["failures"])),
            "warnings": MetadataValue.int(len(verdict["warnings"])),
            "report": MetadataValue.md(markdown),
            "report_uri": ref.uri,
            **uri_metadata(ref.uri),
            "external_assessment": MetadataValue.json(report.get("external_assessment") or {"configured": False}),
        },
    )


def gate_thresholds(recorded: dict, policy: GatePolicy) -> BiasThresholds:
    """The thresholds the report was scored under, each made at least as strict as the policy deployed now."""
    return BiasThresholds(
        min_ratio=policy.stricter("bias_min_ratio", recorded["min_ratio"]),
        max_regression=policy.stricter("bias_max_regression", recorded["max_regression"]),
        metrics=tuple(dict.fromkeys([*policy.bias_gated_metrics, *recorded["metrics"]])),
        require_significance=bool(recorded["require_significance"] and policy.bias_require_significance),
        fail_on_previous_regression=bool(
            recorded["fail_on_previous_regression"] or policy.bias_fail_on_previous_regression
        ),
    )


@asset_check(
    asset=bias_report,
    name="bias_gate",
    blocking=True,
    additional_ins={"lora_adapter": AssetIn("lora_adapter")},
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    automation_condition=AutomationCondition.any_deps_updated(),
    description="No group under the four-fifths ratio; no significant regression against the base model; a "
    "configured bias service agrees; scored on exactly the current adapter.",
)
def bias_gate(
    context: AssetCheckExecutionContext,
    bias_report: dict,
    lora_adapter: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
) -> AssetCheckResult:
    """The promotion gate's bias half: the verdict re-computed from the published report (no model is loaded),
    so it runs alone in seconds (UI: Checks > Execute), e.g. after the deployed thresholds were tightened."""
    from ..core.bias import evaluate_verdict

    store = artifact_store.store()
    report = json.loads((store.local_path(bias_report["key"]) / "bias_report.json").read_text())
    policy = deployed_policy(context)
    thresholds = gate_thresholds(report["verdict"]["thresholds"], policy)
    verdict = evaluate_verdict(report, thresholds)
    problems = [failure["message"] for failure in verdict["failures"]]
    # Fail closed: a configured service must have answered {"passed": true}.
    external = report.get("external_assessment")
    external_passed = external is None or external.get("passed") is True
    if not external_passed:
        problems.append("the bias detection service did not pass this adapter")
    if report["adapter_sha256"] != lora_adapter["sha256"]:
        problems.append("the report is of a different adapter (retrained since); materialise bias_report again")
    templates = bias_report.get("max_templates")
    if templates is not None and templates < policy.bias_min_templates:
        problems.append(
            f"the report scored {templates} probe templates; the deployed policy needs at least "
            f"{policy.bias_min_templates}: materialise bias_report again"
        )
    record_gate_decision(
        training_metadata.get_store(),
        step_identity(context),
        gate="bias_gate",
        passed=not problems,
        thresholds={**thresholds.to_dict(), "max_templates": templates},
        policy=policy,
        artifact_uri=lora_adapter.get("uri"),
        artifact_sha256=lora_adapter["sha256"],
        extra={"report_uri": bias_report["uri"], "external_service_passed": external_passed},
    )
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "summary": verdict["summary"],
            "failures": MetadataValue.json(problems),
            "warnings": MetadataValue.int(len(verdict["warnings"])),
            "external_service_passed": external_passed,
        },
    )
