"""Base-model snapshots."""

import json
import os
import re

from dagster import AssetExecutionContext, Config, DataVersion, MetadataValue, Output, asset
from pydantic import Field

from ..catalog import PHI_NONE, governance_tags, owners, uri_metadata
from ..core.settings import PACKAGED_SMOLLM2
from ..execution import HF_TOKEN_ENV, step_pod_tags
from ..resources import ArtifactStoreResource, ModelHubResource


class BaseModelConfig(Config):
    # Runs started by sensors and schedules carry no run config: PIXTRAIN_BASE_MODEL sets their base model.
    model_ref: str = Field(
        default=os.environ.get("PIXTRAIN_BASE_MODEL") or PACKAGED_SMOLLM2,
        description=f"'{PACKAGED_SMOLLM2}' (offline SmolLM2-135M-Instruct), a local model folder, or a hub id "
        "(default: $PIXTRAIN_BASE_MODEL).",
    )


@asset(
    group_name="models",
    op_tags=step_pod_tags("cpu", secrets=(HF_TOKEN_ENV,)),
    kinds={"huggingface", "pytorch", "safetensors"},
    owners=owners(),
    tags=governance_tags(PHI_NONE, "cpu"),
)
def base_model(
    context: AssetExecutionContext,
    config: BaseModelConfig,
    artifact_store: ArtifactStoreResource,
    model_hub: ModelHubResource,
) -> Output[dict]:
    """The base model as a plain safetensors snapshot plus tokenizer, written once per source content.

    Every later step loads this snapshot, never the source, so they all see the same weights.
    """
    from ..core.models import resolve_model_source, write_snapshot

    store = artifact_store.store()
    source = resolve_model_source(config.model_ref, hf_token=model_hub.token(), cache_dir=model_hub.cache_dir)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", config.model_ref).strip("-")[-60:]
    key = f"models/{slug}-{source.fingerprint[:16]}"
    reused = store.exists(key)
    if not reused:
        context.log.info(f"writing snapshot of {config.model_ref} to {store.uri(key)}")
        with store.stage() as folder:
            write_snapshot(source, folder)
            store.publish(folder, key)
    ref = store.ref(key)
    # Only the small info file is read here; every step that loads the weights verifies them against the manifest.
    info = json.loads((store.local_path(key, verify=False) / "snapshot_info.json").read_text())
    value = {"key": key, **ref.to_dict(), "info": info}
    return Output(
        value,
        data_version=DataVersion(ref.sha256),
        metadata={
            "model_ref": config.model_ref,
            "architecture": info["architecture"],
            "parameter_count": MetadataValue.int(info["parameter_count"]),
            "dtype": info["dtype"],
            "sha256": ref.sha256,
            **uri_metadata(ref.uri),
            "size_bytes": MetadataValue.int(ref.size_bytes),
            "reused_existing_snapshot": reused,
        },
    )
