"""Bias report: counterfactual probes on the base model and the adapter, with the blocking bias gate."""

import json

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from ..core.bias import BiasSettings, BiasThresholds
from ..execution import step_pod_tags
from ..recovery import GPU_POOL, gpu_step_retry_policy
from ..resources import ArtifactStoreResource, BiasDetectionClient, TrainingMetadataResource, TrainingRuntimeResource
from ..resources.metadata import step_identity


_SETTINGS = BiasSettings()
_THRESHOLDS = _SETTINGS.thresholds


class BiasReportConfig(Config):
    max_templates: int | None = Field(default=_SETTINGS.max_templates, ge=1,
                                      description="Probe templates scored; None = all.")
    generation_templates: int = Field(default=_SETTINGS.generation_templates, ge=0,
                                      description="Templates whose replies are generated (slow on CPU).")
    max_new_tokens: int = Field(default=_SETTINGS.max_new_tokens, ge=1)
    min_ratio: float = Field(default=_THRESHOLDS.min_ratio, gt=0, le=1, description="Four-fifths rule.")
    max_regression: float = Field(default=_THRESHOLDS.max_regression, ge=0,
                                  description="Largest allowed impact-ratio drop of a group against the base model.")
    gated_metrics: list[str] = Field(default=list(_THRESHOLDS.metrics),
                                     description="Metrics that can fail the gate; the others only warn.")
    require_significance: bool = Field(default=_THRESHOLDS.require_significance,
                                       description="Fail only when the whole 95% interval is past the threshold.")
    bootstrap_resamples: int = Field(default=_SETTINGS.bootstrap_resamples, ge=100)
    seed: int = _SETTINGS.seed

    def to_settings(self) -> BiasSettings:
        return BiasSettings(
            max_templates=self.max_templates, generation_templates=self.generation_templates,
            max_new_tokens=self.max_new_tokens, bootstrap_resamples=self.bootstrap_resamples, seed=self.seed,
            thresholds=BiasThresholds(min_ratio=self.min_ratio, max_regression=self.max_regression,
                                      metrics=tuple(self.gated_metrics),
                                      require_significance=self.require_significance),
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
    op_tags=step_pod_tags("gpu"),
    pool=GPU_POOL,
    retry_policy=gpu_step_retry_policy(),
    code_version="1",
    automation_condition=AutomationCondition.eager(),
    check_specs=[AssetCheckSpec(
        "bias_gate", asset="bias_report", blocking=True,
        description="No group under the four-fifths ratio; no significant regression against the base model.",
    )],
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

    store = artifact_store.store()
    settings = config.to_settings()
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
        who.run_id, who.step_key, adapter_sha256=lora_adapter["sha256"], eval_name="bias_report",
        metrics={"verdict": verdict["status"], "failures": len(verdict["failures"]), "report_uri": ref.uri,
                 "probe_set_sha256": report["probe_set"]["sha256"]},
        passed=bool(verdict["passed"] and external_passed),
    )
    value = {"key": store.key_of(ref.uri), **ref.to_dict(), "adapter_sha256": lora_adapter["sha256"],
             "verdict": verdict, "probe_set_sha256": report["probe_set"]["sha256"]}
    yield Output(
        value,
        metadata={
            "verdict": verdict["status"],
            "probe_set_sha256": report["probe_set"]["sha256"],
            "failures": MetadataValue.int(len(verdict["failures"])),
            "warnings": MetadataValue.int(len(verdict["warnings"])),
            "report": MetadataValue.md(markdown),
            "report_uri": ref.uri,
            "external_assessment": MetadataValue.json(report.get("external_assessment") or {"configured": False}),
        },
    )
    yield AssetCheckResult(
        check_name="bias_gate",
        passed=bool(verdict["passed"] and external_passed),
        metadata={"summary": verdict["summary"],
                  "failures": MetadataValue.json([f["message"] for f in verdict["failures"]]),
                  "external_service_passed": external_passed},
    )
