"""Declarative automation: a new adapter pulls evaluation, bias report and promotion; promotion needs passing gates."""

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    evaluate_automation_conditions,
)

UPSTREAM = ["base_model", "raw_conversations", "training_dataset", "lora_adapter", "training_checkpoints"]


def requested(result) -> set[str]:
    return {
        key.to_user_string()
        for key in map(AssetKey, ["adapter_evaluation", "bias_report", "promoted_adapter"])
        if result.get_num_requested(key)
    }


def test_new_adapter_triggers_evaluation_and_bias_report_then_promotion_only_after_passing_checks(pipeline_env):
    from pixtrain_dagster.definitions import build_definitions

    defs = build_definitions()
    instance = DagsterInstance.ephemeral()
    result = evaluate_automation_conditions(defs=defs, instance=instance)
    for key in UPSTREAM:
        instance.report_runless_asset_event(AssetMaterialization(key))
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    # One run: the gates' blocking checks stop the promotion step inside it when they fail.
    assert requested(result) == {"adapter_evaluation", "bias_report", "promoted_adapter"}

    # Evaluation passed its check, the bias gate failed: no promotion.
    instance.report_runless_asset_event(AssetMaterialization("adapter_evaluation"))
    instance.report_runless_asset_event(AssetCheckEvaluation(AssetKey("adapter_evaluation"), "training_sanity", True))
    instance.report_runless_asset_event(AssetMaterialization("bias_report"))
    instance.report_runless_asset_event(AssetCheckEvaluation(AssetKey("bias_report"), "bias_gate", False))
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert "promoted_adapter" not in requested(result)

    # A re-run of the bias report passes the gate: now the adapter is promoted.
    instance.report_runless_asset_event(AssetMaterialization("bias_report"))
    instance.report_runless_asset_event(AssetCheckEvaluation(AssetKey("bias_report"), "bias_gate", True))
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert requested(result) == {"promoted_adapter"}
