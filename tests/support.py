"""Constants and run-config builders shared by test modules (import as `from support import ...`)."""

from pathlib import Path

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
SAMPLE_DATASET = REPO_ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"

# Small, fast training settings for the tiny model, as Dagster run config.
TINY_TRAINING_CONFIG = {
    "max_steps": 4,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_seq_len": 192,
    "checkpoint_every_n_steps": 2,
    "learning_rate": 5e-3,
    "warmup_steps": 1,
}


def tiny_training_settings(**overrides):
    """LoraTrainingSettings small enough for the tiny model on CPU (seconds): 6 steps of 2 x 2 rows of 192 tokens,
    a checkpoint every 2; each test overrides what it is about."""
    from pixtrain_dagster.core.settings import LoraTrainingSettings

    base = {
        "max_steps": 6,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_seq_len": 192,
        "learning_rate": 5e-3,
        "warmup_steps": 1,
        "checkpoint_every_n_steps": 2,
    }
    return LoraTrainingSettings(**{**base, **overrides})


def tiny_run_config(tiny_model_dir: Path, **training_overrides) -> dict:
    """Run config that points base_model at the tiny model and keeps every step small."""
    return {
        "ops": {
            "base_model": {"config": {"model_ref": str(tiny_model_dir)}},
            "lora_training": {"config": {**TINY_TRAINING_CONFIG, **training_overrides}},
            "adapter_evaluation": {"config": {"sample_replies": 1, "max_new_tokens": 8}},
            "bias_report": {"config": {"max_new_tokens": 8, "bootstrap_resamples": 200}},
        }
    }


# The training half of the graph: enough to exercise lora_training through Dagster.
TRAINING_ASSETS = ("base_model", "raw_conversations", "training_dataset", "lora_adapter", "training_checkpoints")


def run_job(run_config, selection=None, raise_on_error=True):
    """Materialise the code location's assets in-process on the current instance (``selection``: asset keys)."""
    from dagster import AssetKey, DagsterInstance

    from pixtrain_dagster.definitions import build_definitions

    job = build_definitions().resolve_implicit_global_asset_job_def()
    keys = [AssetKey(k) if isinstance(k, str) else k for k in selection] if selection else None
    return job.execute_in_process(
        run_config=run_config, instance=DagsterInstance.get(), asset_selection=keys, raise_on_error=raise_on_error
    )


def materialize_with_cli(selection: str, config_file: Path, env: dict, timeout: float = 600):
    """``dagster asset materialize -m pixtrain_dagster.definitions`` as a user runs it, from the repository root."""
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pixtrain_dagster.definitions",
        "--select",
        selection,
        "-c",
        str(config_file),
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def materialized_metadata(result, key):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def run_log_messages(result) -> list[str]:
    from dagster import DagsterInstance

    return [entry.user_message for entry in DagsterInstance.get().all_logs(result.run_id)]


def closed_schema(node):
    """A JSON schema with ``additionalProperties: false`` on every object that lists its properties (except
    Kubernetes' preserve-unknown-fields), so a misspelt field fails as the API server would reject it."""
    if isinstance(node, dict):
        node = {k: closed_schema(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [closed_schema(v) for v in node]
    return node
