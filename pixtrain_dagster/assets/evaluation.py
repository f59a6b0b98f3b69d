"""Held-out evaluation of the adapter against its base model."""


import json

from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from ..core.settings import EvaluationSettings
from ..execution import step_pod_tags
from ..resources import ArtifactStoreResource, TrainingRuntimeResource

_DEFAULTS = EvaluationSettings()


class AdapterEvaluationConfig(Config):
    max_seq_len: int = Field(default=_DEFAULTS.max_seq_len, ge=16)
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1)
    sample_replies: int = Field(default=_DEFAULTS.sample_replies, ge=0, description="Replies shown in the report.")
    max_new_tokens: int = Field(default=_DEFAULTS.max_new_tokens, ge=1)


@asset(group_name="evaluation", op_tags=step_pod_tags("gpu"), code_version="1")
def adapter_evaluation(
    context: AssetExecutionContext,
    config: AdapterEvaluationConfig,
    base_model: dict,
    training_dataset: dict,
    lora_adapter: dict,
    artifact_store: ArtifactStoreResource,
    training_runtime: TrainingRuntimeResource,
) -> Output[dict]:
    """Validation loss and perplexity of the base model and of the adapter on the held-out split, with samples."""
    from ..core.conversations import load_conversations
    from ..core.evaluation import evaluate_adapter
    from ..core.models import pick_device

    store = artifact_store.store()
    result = evaluate_adapter(
        base_snapshot_dir=store.local_path(base_model["key"]),
        adapter_dir=store.local_path(lora_adapter["key"]),
        validation_conversations=load_conversations(store.local_path(training_dataset["key"]) / "validation.jsonl"),
        settings=EvaluationSettings(**config.model_dump()),
        device=pick_device(training_runtime.device),
    )
    report = {"adapter_sha256": lora_adapter["sha256"], "base_model_sha256": base_model["sha256"],
              "dataset_sha256": training_dataset["sha256"], **result.to_dict()}
    markdown = result.to_markdown()
    with store.stage() as folder:
        (folder / "evaluation.json").write_text(json.dumps(report, indent=2))
        (folder / "evaluation.md").write_text(f"# Adapter evaluation\n\n{markdown}\n")
        ref = store.publish(folder, f"evaluations/{lora_adapter['sha256'][:16]}", replace=True)
    value = {"key": store.key_of(ref.uri), **ref.to_dict(), **report}
    return Output(
        value,
        metadata={
            "base_validation_loss": MetadataValue.float(result.base.loss),
            "adapter_validation_loss": MetadataValue.float(result.adapter.loss),
            "base_perplexity": MetadataValue.float(result.base.perplexity),
            "adapter_perplexity": MetadataValue.float(result.adapter.perplexity),
            "perplexity_ratio": MetadataValue.float(result.perplexity_ratio),
            "report": MetadataValue.md(markdown),
            "uri": MetadataValue.path(ref.uri),
        },
    )
