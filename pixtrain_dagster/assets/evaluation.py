"""Held-out evaluation of the adapter against its base model."""

import json
import math

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    Config,
    MetadataValue,
    Output,
    asset,
    asset_check,
)
from pydantic import Field

from ..catalog import PHI_SCRUBBED, governance_tags, owners, uri_metadata
from ..core.settings import EvaluationSettings
from ..execution import METADATA_DB_PASSWORD_ENV, step_pod_tags
from ..gates import deployed_policy, record_gate_decision, resolve_or_fail
from ..recovery import GPU_POOL, gpu_step_retry_policy
from ..resources import ArtifactStoreResource, TrainingMetadataResource, TrainingRuntimeResource
from ..resources.metadata import step_identity

_DEFAULTS = EvaluationSettings()


class AdapterEvaluationConfig(Config):
    max_seq_len: int = Field(
        default=_DEFAULTS.max_seq_len,
        ge=16,
        description="Tokens per scored conversation; whole turns that do not fit are dropped.",
    )
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1, description="Conversations per forward pass.")
    sample_replies: int = Field(default=_DEFAULTS.sample_replies, ge=0, description="Replies shown in the report.")
    max_new_tokens: int = Field(default=_DEFAULTS.max_new_tokens, ge=1, description="Length of each sample reply.")
    max_perplexity_increase: float | None = Field(
        default=None,
        ge=0,
        description="training_sanity fails when adapter perplexity exceeds base perplexity by more than this "
        "fraction. Unset: the deployed limit (PIXTRAIN_GATE_MAX_PERPLEXITY_INCREASE); a run may only "
        "set a smaller value.",
    )


@asset(
    group_name="evaluation",
    op_tags=step_pod_tags("gpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    pool=GPU_POOL,
    retry_policy=gpu_step_retry_policy(),
    automation_condition=AutomationCondition.eager(),
    kinds={"pytorch", "huggingface", "postgres"},  # metrics also go to the training metadata database
    owners=owners(),
    tags=governance_tags(PHI_SCRUBBED, "gpu"),  # the artifact holds sample replies to held-out (scrubbed) prompts
)
def adapter_evaluation(
    context: AssetExecutionContext,
    config: AdapterEvaluationConfig,
    base_model: dict,
    training_dataset: dict,
    lora_adapter: dict,
    artifact_store: ArtifactStoreResource,
    training_runtime: TrainingRuntimeResource,
    training_metadata: TrainingMetadataResource,
):
    """Validation loss and perplexity of the base model and of the adapter on the held-out split.

    Sample replies are written to the evaluation artifact only, never to Dagster metadata.
    """
    from ..core.conversations import load_conversations
    from ..core.evaluation import evaluate_adapter
    from ..core.models import pick_device
    from ..core.telemetry import StepTelemetry, serve_step_metrics

    # Before any work: a run that asks for a looser gate than deployed fails here, naming the field.
    policy = deployed_policy(context)
    max_increase = resolve_or_fail(lambda: policy.numeric("max_perplexity_increase", config.max_perplexity_increase))
    store = artifact_store.store()
    # /metrics (process and GPU gauges) while the step runs; docs/monitoring.md.
    with serve_step_metrics(StepTelemetry("adapter_evaluation", base_model["info"]["source_reference"])):
        result = evaluate_adapter(
            base_snapshot_dir=store.local_path(base_model["key"]),
            adapter_dir=store.local_path(lora_adapter["key"]),
            validation_conversations=load_conversations(store.local_path(training_dataset["key"]) / "validation.jsonl"),
            settings=EvaluationSettings(**config.model_dump(exclude={"max_perplexity_increase"})),
            device=pick_device(training_runtime.device),
        )
    sanity = training_sanity(
        lora_adapter["train_losses"], result.base.perplexity, result.adapter.perplexity, max_increase
    )
    sanity["thresholds"] = {"max_perplexity_increase": max_increase}
    report = {
        "adapter_sha256": lora_adapter["sha256"],
        "base_model_sha256": base_model["sha256"],
        "dataset_sha256": training_dataset["sha256"],
        **result.to_dict(),
        "training_sanity": sanity,
    }
    # Conversation text (sample prompts, references, replies) lives only in the evaluation artifact on the
    # volume: the step's output value, Dagster metadata, logs and the metadata database get numbers, hashes
    # and URIs, because their audience (UI users, log shippers) is wider than the dataset's.
    summary = {key: value for key, value in report.items() if key != "samples"}
    who = step_identity(context)
    training_metadata.get_store().record_evaluation(
        who.run_id,
        who.step_key,
        adapter_sha256=lora_adapter["sha256"],
        eval_name="heldout_perplexity",
        metrics={
            "base_loss": result.base.loss,
            "adapter_loss": result.adapter.loss,
            "base_perplexity": result.base.perplexity,
            "adapter_perplexity": result.adapter.perplexity,
        },
        passed=not sanity["problems"],
        eval_dataset_hash=training_dataset["sha256"],
    )
    markdown = result.to_markdown()
    numbers_only = type(result)(base=result.base, adapter=result.adapter, samples=[]).to_markdown()
    with store.stage() as folder:
        (folder / "evaluation.json").write_text(json.dumps(report, indent=2))
        (folder / "evaluation.md").write_text(f"# Adapter evaluation\n\n{markdown}\n")
        ref = store.publish(folder, f"evaluations/{lora_adapter['sha256'][:16]}", replace=True)
    value = {"key": store.key_of(ref.uri), **ref.to_dict(), **summary, "sample_count": len(result.samples)}
    return Output(
        value,
        metadata={
            "base_validation_loss": MetadataValue.float(result.base.loss),
            "adapter_validation_loss": MetadataValue.float(result.adapter.loss),
            "base_perplexity": MetadataValue.float(result.base.perplexity),
            "adapter_perplexity": MetadataValue.float(result.adapter.perplexity),
            "perplexity_ratio": MetadataValue.float(result.perplexity_ratio),
            "report": MetadataValue.md(numbers_only),
            "sample_replies": MetadataValue.md(
                f"{len(result.samples)} sample replies are in `{ref.uri}/evaluation.md` (not shown here: they "
                "are client text)."
            ),
            **uri_metadata(ref.uri),
        },
    )


def training_sanity(
    train_losses: list[float], base_perplexity: float, adapter_perplexity: float, max_perplexity_increase: float
) -> dict:
    """The promotion gate's training half: what is wrong, if anything, as readable sentences."""
    problems = []
    if not train_losses or not all(math.isfinite(x) for x in train_losses):
        problems.append("training loss is missing or not finite")
    else:
        window = max(1, len(train_losses) // 4)
        first, last = sum(train_losses[:window]) / window, sum(train_losses[-window:]) / window
        if not last < first:
            problems.append(f"training loss did not decrease (first {window} batches {first:.4f}, last {last:.4f})")
    limit = base_perplexity * (1 + max_perplexity_increase)
    if not adapter_perplexity <= limit:  # also true for NaN
        problems.append(
            f"adapter perplexity {adapter_perplexity:.3f} exceeds base {base_perplexity:.3f} "
            f"by more than {max_perplexity_increase:.0%} (limit {limit:.3f})"
        )
    return {
        "problems": problems,
        "base_perplexity": base_perplexity,
        "adapter_perplexity": adapter_perplexity,
        "perplexity_limit": limit,
    }


@asset_check(
    asset=adapter_evaluation,
    name="training_sanity",
    blocking=True,
    additional_ins={"lora_adapter": AssetIn("lora_adapter")},
    op_tags=step_pod_tags("cpu", secrets=(METADATA_DB_PASSWORD_ENV,)),
    automation_condition=AutomationCondition.any_deps_updated(),
    description="Finite, decreasing training loss; held-out perplexity not worse than the base model's by more than "
    "max_perplexity_increase; evaluated on exactly the current adapter.",
)
def training_sanity_check(
    context: AssetCheckExecutionContext,
    adapter_evaluation: dict,
    lora_adapter: dict,
    artifact_store: ArtifactStoreResource,
    training_metadata: TrainingMetadataResource,
) -> AssetCheckResult:
    """The promotion gate's training half, re-read from the published evaluation; runs alone too (UI: Checks >
    Execute), e.g. after the deployed margin was tightened."""
    store = artifact_store.store()
    report = json.loads((store.local_path(adapter_evaluation["key"]) / "evaluation.json").read_text())
    policy = deployed_policy(context)
    # The margin the evaluation ran with (already no looser than the policy then), or the deployed one if stricter now.
    margin = policy.stricter(
        "max_perplexity_increase", report["training_sanity"]["thresholds"]["max_perplexity_increase"]
    )
    sanity = training_sanity(
        lora_adapter["train_losses"], report["base"]["perplexity"], report["adapter"]["perplexity"], margin
    )
    if report["adapter_sha256"] != lora_adapter["sha256"]:
        sanity["problems"].append(
            "the evaluation is of a different adapter (retrained since); materialise adapter_evaluation again"
        )
    record_gate_decision(
        training_metadata.get_store(),
        step_identity(context),
        gate="training_sanity",
        passed=not sanity["problems"],
        thresholds={"max_perplexity_increase": margin},
        policy=policy,
        artifact_uri=lora_adapter.get("uri"),
        artifact_sha256=lora_adapter["sha256"],
    )
    return AssetCheckResult(
        passed=not sanity["problems"],
        metadata={
            **{k: MetadataValue.json(v) if isinstance(v, (list, dict)) else v for k, v in sanity.items()},
            "max_perplexity_increase": margin,
        },
    )
