"""Constants and run-config builders shared by test modules (import as `from support import ...`)."""

from pathlib import Path

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
SAMPLE_DATASET = REPO_ROOT / "pixtrain_dagster" / "sample_data" / "conversations.jsonl"

# Small, fast training settings for the tiny model, as Dagster run config.
TINY_TRAINING_CONFIG = {"max_steps": 4, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                        "max_seq_len": 192, "checkpoint_every_n_steps": 2, "learning_rate": 5e-3,
                        "warmup_steps": 1}


def tiny_run_config(tiny_model_dir: Path, **training_overrides) -> dict:
    """Run config that points base_model at the tiny model and keeps every step small."""
    return {"ops": {
        "base_model": {"config": {"model_ref": str(tiny_model_dir)}},
        "lora_training": {"config": {**TINY_TRAINING_CONFIG, **training_overrides}},
        "adapter_evaluation": {"config": {"sample_replies": 1, "max_new_tokens": 8}},
        "bias_report": {"config": {"max_new_tokens": 8, "bootstrap_resamples": 200}},
    }}
