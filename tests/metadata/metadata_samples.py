"""Sample records shared by the metadata-store tests."""

from __future__ import annotations

import hashlib

from pixtrain_dagster.metadata import TrainingMetadataStore


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


DATASET_HASH = sha256_of("dataset-v1")
BASE_MODEL_SHA256 = sha256_of("tiny-llama")


def record_training(
    store: TrainingMetadataStore,
    run_id: str = "run-1",
    *,
    step_key: str = "lora_adapter",
    adapter_name: str = "adapter-1",
    num_checkpoints: int = 2,
    attempt: int = 0,
) -> tuple[str, str]:
    """Write what one training step writes: dataset, start, checkpoints, finish. Returns (adapter sha, uri)."""
    store.record_dataset_version(
        DATASET_HASH,
        source_uri="file:///data/conversations.jsonl",
        num_rows_raw=120,
        num_rows_clean=117,
        scrub_counts={"email": 4, "phone": 2},
        run_id=run_id,
    )
    store.start_training_run(
        run_id,
        step_key,
        dataset_hash=DATASET_HASH,
        base_model_ref="tests/tiny-llama",
        base_model_sha256=BASE_MODEL_SHA256,
        code_version="0.1.0",
        git_commit="a0c3e2c",
        hyperparameters={"lora_r": 8, "learning_rate": 2e-4},
        attempt=attempt,
    )
    for global_step in range(1, num_checkpoints + 1):
        store.record_checkpoint(
            run_id,
            step_key,
            global_step=global_step * 10,
            uri=f"file:///artifacts/{run_id}/checkpoint-{global_step * 10}",
            sha256=sha256_of(f"{run_id}-ckpt-{global_step}"),
            size_bytes=1000 * global_step,
        )
    adapter_sha256, adapter_uri = sha256_of(adapter_name), f"file:///artifacts/{run_id}/{adapter_name}"
    store.finish_training_run(
        run_id,
        step_key,
        status="succeeded",
        metrics={"train_loss": 1.25},
        adapter_uri=adapter_uri,
        adapter_sha256=adapter_sha256,
        attempt=attempt,
    )
    return adapter_sha256, adapter_uri
